"""/docs (Swagger UI) and /redoc served from assets shipped in a Python package, so they work without a network.

FastAPI's own pages load their JS/CSS from a CDN; `fastapi_offline` ships the same Swagger UI and ReDoc bundles,
which are mounted here under STATIC_URL.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/docs-static"
ASSETS = Path(fastapi_offline.__file__).parent / "static"
SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js",
                                               "favicon.png")


def mount_offline_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve the doc pages; the app must be built with docs_url=None and redoc_url=None."""
    missing = [name for name in (SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON) if not (ASSETS / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi_offline ships no {', '.join(missing)} under {ASSETS}")
    app.mount(STATIC_URL, StaticFiles(directory=ASSETS), name="docs-static")
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or f"{docs_url}/oauth2-redirect"

    def asset(request: Request, name: str) -> str:
        return f"{request.scope.get('root_path', '')}{STATIC_URL}/{name}"

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}",
                                   title=f"{app.title} - Swagger UI", oauth2_redirect_url=oauth2_redirect_url,
                                   swagger_js_url=asset(request, SWAGGER_JS),
                                   swagger_css_url=asset(request, SWAGGER_CSS),
                                   swagger_favicon_url=asset(request, FAVICON))

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}",
                              title=f"{app.title} - ReDoc", redoc_js_url=asset(request, REDOC_JS),
                              redoc_favicon_url=asset(request, FAVICON), with_google_fonts=False)
