"""The browser playground at `/`: plain HTML, CSS and JS shipped inside the package (no CDN, no build step).

The page only talks to the public API (/readyz, /openapi.json, /v1/...), so it works the same against an API-only
replica; serving three static files keeps the API process torch-free.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).parent / "static" / "playground"
STATIC_URL = "/playground"
FILES = ("index.html", "app.js", "style.css")


def mount_playground(app: FastAPI, url: str = "/") -> None:
    """`url` serves index.html; its assets live under STATIC_URL. A prefix mount, not one at `/`: a catch-all
    mount would answer unknown paths and wrong methods itself, instead of the API's JSON 404 and 405."""
    missing = [name for name in FILES if not (ASSETS / name).is_file()]
    if missing:
        raise RuntimeError(f"the playground's {', '.join(missing)} missing under {ASSETS} (package data)")
    app.mount(STATIC_URL, StaticFiles(directory=ASSETS), name="playground")

    @app.get(url, include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(ASSETS / "index.html", headers={"Cache-Control": "no-cache"})
