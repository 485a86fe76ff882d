"""The browser playground at `/`, in a real headless Chromium (Selenium) against a real `ptq4dm serve`.

The server runs the tiny UNet at fp32 and fake-quant w8a8 with its embedded worker. With PTQ4DM_SCREENSHOT set
(the README's picture: `PTQ4DM_SCREENSHOT=docs/playground.png pytest tests/test_playground.py`) it serves the
built-in model instead, and the comparison's screenshot is also written to that path.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytest_plugins = ["service.testing"]
# Small enough to calibrate the tiny UNet in about a second (as tests/test_service_quantized.py does).
CALIBRATION = {"n_samples": 8, "steps": 4, "batch_size": 8, "n_candidates": 10, "act_samples": 4096}
SCREENSHOT = os.environ.get("PTQ4DM_SCREENSHOT")


def _browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver); a skip when missing, except in CI (.ci/run installs them; absence fails there)."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
        have_selenium = True
    except ImportError:
        have_selenium = False
    missing = [name for name, ok in (("chromium", chromium), ("chromedriver", driver), ("selenium", have_selenium))
               if not ok]
    if missing:
        reason = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver; pip install selenium)"
        if os.environ.get("DEPLOY_TOOLS_REQUIRED"):
            pytest.fail(reason)
        pytest.skip(reason)
    return chromium, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,920", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Every variant ready: fp32, and w8a8 once calibrated (tiny) or compiled from shipped statistics (built-in)."""
    deadline = time.monotonic() + timeout_s
    body: object = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ptq4dm serve exited with {proc.returncode}"
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
            body = r.json()
            if r.status_code == 200 and all(m["state"] == "ready" for m in body["models"].values()):
                return
        except httpx.HTTPError as exc:
            body = exc
        time.sleep(0.2)
    raise AssertionError(f"never ready: {body}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict]:
    """`ptq4dm serve` (the console script's module, so PYTHONPATH picks this checkout) on a free port."""
    from service.testing import free_port

    tmp = tmp_path_factory.mktemp("playground")
    port = free_port()
    flags = {"port": port, "calibration-cache-dir": tmp / "calibration", "torch-threads": 1,
             "progress-interval-ms": 0, "max-n": 4}
    if SCREENSHOT:
        model = {"name": "fashion-mnist-ddpm", "size": 32, "steps": 50, "n": 4}
    else:
        model = {"name": "tiny", "size": 16, "steps": 12, "n": 3}
        flags |= {"models": f"tiny={tiny_model_dir}", "precisions": "fp32,w8a8", "backend": "fake",
                  "calibration": json.dumps(CALIBRATION)}
    log_path = tmp / "serve.log"
    with log_path.open("w") as log:
        args = [sys.executable, "-m", "service.cli", "serve", *(f"--{k}={v}" for k, v in flags.items())]
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, 240 if SCREENSHOT else 90)
        yield {"url": url, **model}
    except AssertionError:
        print(log_path.read_text()[-4000:])
        raise
    finally:
        proc.terminate()
        proc.wait(30)


# -- page helpers ---------------------------------------------------------------------------------------------------

def _wait(driver, script: str, timeout_s: float = 60) -> object:  # noqa: ANN001
    """Polls a JS expression until it is truthy; returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(lambda d: d.execute_script(f"return {script}"))


def _open(driver, url: str) -> None:  # noqa: ANN001
    driver.get_log("browser")  # reading the log empties it: later checks see this page's messages only
    driver.get(f"{url}/")
    _wait(driver, "document.querySelectorAll('#precision option').length > 0")


def _fill(driver, **fields: object) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for name, value in fields.items():
        element = driver.find_element(By.ID, name)
        if element.tag_name == "select":
            Select(element).select_by_value(str(value))
        else:
            element.clear()
            element.send_keys(str(value))


def _panel_done(driver) -> object:  # noqa: ANN001
    """Each panel's state once all of them finished and their images decoded (or failed)."""
    return _wait(driver, """(() => {
        const panels = [...document.querySelectorAll('.panel')];
        const done = panels.length && panels.every((p) => /^(Succeeded|Failed|Cancelled)/.test(
            p.querySelector('.state').textContent) && [...p.querySelectorAll('img')].every((i) => i.complete));
        return done && panels.map((p) => ({
            state: p.querySelector('.state').textContent,
            bar: [p.querySelector('.bar').value, p.querySelector('.bar').max],
            events: [...p.querySelectorAll('.events li')].map((li) => li.textContent),
            images: [...p.querySelectorAll('.grid img')].map((i) => ({src: i.src, width: i.naturalWidth,
                                                                     psnr: i.closest('figure').dataset.psnr})),
            meta: Object.fromEntries([...p.querySelectorAll('.meta dt')].map((dt) =>
                [dt.textContent, dt.nextElementSibling.textContent])),
            summary: p.querySelector('.summary').textContent,
        }));
    })()""")


def _console_errors(driver) -> list[str]:  # noqa: ANN001
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _pixels(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(httpx.get(url, timeout=10).content)).convert("L"), dtype=np.float64)


# -- cases ------------------------------------------------------------------------------------------------------------

def test_generate_from_the_form_shows_live_progress_then_decoded_images(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _open(browser, server["url"])
    assert browser.find_element(By.ID, "model").get_attribute("value") == server["name"]
    assert browser.find_element(By.ID, "steps").get_attribute("max") == "1000"  # the live limit, from /openapi.json
    steps, n = server["steps"], 2
    _fill(browser, precision="fp32", sampler="ddpm", steps=steps, n=n, seed=7)
    browser.find_element(By.ID, "seed").send_keys(Keys.ENTER)  # the keyboard submits the form
    (panel,) = _panel_done(browser)

    assert panel["state"].startswith("Succeeded"), panel
    assert panel["bar"] == [steps, steps]
    events = panel["events"]
    assert events[0].startswith("queued") and events[-1].startswith("succeeded"), events
    running = [json.loads(e.removeprefix("running ")) for e in events if e.startswith("running")]
    assert running[0] == {"step": 0, "total": steps} and running[-1]["step"] >= steps - 1, running  # live, per step
    assert [img["width"] for img in panel["images"]] == [server["size"]] * n  # decoded PNGs
    assert panel["meta"]["seeds"] == "7, 8" and panel["meta"]["calibration"] == "none (full precision)"
    assert float(panel["meta"]["ran"].removesuffix(" s")) > 0
    assert _console_errors(browser) == []


def test_a_refused_request_names_the_field(browser, server):
    from selenium.webdriver.common.by import By

    _open(browser, server["url"])
    _fill(browser, steps=5000, seed=1)
    browser.find_element(By.ID, "generate").click()
    errors = _wait(browser, "!document.querySelector('#errors').hidden && document.querySelector('#errors').innerText")
    assert "HTTP 422" in errors and "steps: steps must be in 1..1000" in errors
    assert browser.find_element(By.ID, "steps").get_attribute("aria-invalid") == "true"
    assert browser.find_element(By.ID, "steps-error").text == "steps must be in 1..1000"
    assert browser.switch_to.active_element.get_attribute("id") == "errors"  # focus moves to the message
    assert browser.find_elements(By.CSS_SELECTOR, ".panel") == []
    assert [m for m in _console_errors(browser) if "status of 422" not in m] == []  # the browser logs every 4xx


def test_side_by_side_fp32_and_quantized_with_per_image_psnr(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, server["url"])
    _fill(browser, precision="w8a8", sampler="ddim", steps=server["steps"], n=server["n"], seed=3)
    browser.find_element(By.ID, "compare").click()
    _panel_done(browser)
    _wait(browser, "document.querySelector('.compare .panel:last-child .summary').textContent")  # PSNR: after both
    fp, q = _panel_done(browser)

    for panel in (fp, q):
        assert panel["state"].startswith("Succeeded"), panel
        assert [img["width"] for img in panel["images"]] == [server["size"]] * server["n"]
        assert panel["meta"]["seeds"] == ", ".join(str(3 + k) for k in range(server["n"]))
    assert fp["meta"]["calibration"] == "none (full precision)"
    assert re.fullmatch(r"[0-9a-f]{64}", q["meta"]["calibration"]), q["meta"]
    assert "/w8a8/" in q["meta"]["model version"]
    assert re.match(r"PSNR vs fp32, same seeds: (mean \d+\.\d\d dB|identical images)", q["summary"]), q["summary"]
    # The browser's PSNR (canvas pixels) is the one computed here from the same PNGs.
    for a, b in zip(fp["images"], q["images"], strict=True):
        mse = np.mean((_pixels(a["src"]) - _pixels(b["src"])) ** 2)
        expected = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
        assert float(b["psnr"]) == pytest.approx(expected, rel=1e-9), (b, expected)
    assert _console_errors(browser) == []

    shot = tmp_path / "playground.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG")
    if SCREENSHOT:
        Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
