"""The browser playground at `/`, in a real headless Chromium (Selenium) against a real `ptq4dm serve`.

The server runs the tiny UNet at fp32 and fake-quant w8a8 with its embedded worker, beside the built-in
(unconditional) model and tiny random class-conditional and text-to-image models (tests/serving_helpers.py), whose
form fields the page shows only for them. With PTQ4DM_SCREENSHOT set (the README's picture:
`PTQ4DM_SCREENSHOT=docs/playground.png pytest tests/test_playground.py`) it serves the built-in model alone instead,
and the comparison's screenshot is also written to that path.
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
from serving_helpers import CALIBRATION, CLASSES, save_class_conditional, save_text_to_image

from quantizer.constants import BUILTIN_MODEL_NAME
from quantizer.diffusion.kinds import default_class_label

pytest_plugins = ["service.testing"]
SCREENSHOT = os.environ.get("PTQ4DM_SCREENSHOT")
CLASS_NAMES = ("cat", "dog", "fox", "owl")[:CLASSES]  # the class-conditional model's model_index.json id2label


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
        model = {"name": BUILTIN_MODEL_NAME, "size": 32, "steps": 50, "n": 4}
    else:
        model = {"name": "tiny", "size": 16, "steps": 12, "n": 3}
        cc = save_class_conditional(tmp / "cc", class_names=CLASS_NAMES)
        sd = save_text_to_image(tmp / "sd")
        models = f"tiny={tiny_model_dir},cc={cc},sd={sd},{BUILTIN_MODEL_NAME}"  # the first one is the default
        flags |= {"models": models, "precisions": "fp32,w8a8", "backend": "fake",
                  "calibration": json.dumps(CALIBRATION)}
    log_path = tmp / "serve.log"
    with log_path.open("w") as log:
        args = [sys.executable, "-m", "service.cli", "serve", *(f"--{k}={v}" for k, v in flags.items())]
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, 240)
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


# -- conditioning: a class or a prompt, where the model takes one ------------------------------------------------------

CONDITIONING = ("class_labels", "prompt", "negative_prompt", "guidance_scale")


def _shown(driver) -> set[str]:  # noqa: ANN001
    """Which conditioning inputs the page shows now (their field is not hidden)."""
    from selenium.webdriver.common.by import By

    return {name for name in CONDITIONING if driver.find_element(By.ID, name).is_displayed()}


def _choose_model(driver, name: str) -> None:  # noqa: ANN001
    """Selects the model as a user does (the change event shows its fields)."""
    _fill(driver, model=name)
    _wait(driver, f"document.querySelector('#model').value === {json.dumps(name)}")


def _recorded(server: dict, panel: dict) -> dict:
    """The job as the API recorded it (GET /v1/jobs/{id}), from the id the panel shows."""
    r = httpx.get(f"{server['url']}/v1/jobs/{panel['meta']['job']}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


needs_conditional_models = pytest.mark.skipif(bool(SCREENSHOT), reason="PTQ4DM_SCREENSHOT serves the built-in model "
                                              "alone")


@needs_conditional_models
def test_the_conditioning_fields_follow_the_models_kind(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(browser, server["url"])
    for model in ("tiny", BUILTIN_MODEL_NAME):  # unconditional: no class, no prompt
        _choose_model(browser, model)
        assert _shown(browser) == set(), model
    _choose_model(browser, "cc")
    assert _shown(browser) == {"class_labels"}
    options = [(o.get_attribute("value"), o.text) for o in Select(browser.find_element(By.ID, "class_labels")).options]
    assert options == [("", "random (from each image's seed)")] + [(str(c), f"{c} · {name}")
                                                                    for c, name in enumerate(CLASS_NAMES)]
    _choose_model(browser, "sd")
    assert _shown(browser) == {"prompt", "negative_prompt", "guidance_scale"}
    _choose_model(browser, "tiny")
    assert _shown(browser) == set()
    assert _console_errors(browser) == []


@needs_conditional_models
def test_a_chosen_class_is_generated_and_recorded(browser, server):
    from selenium.webdriver.common.by import By

    _open(browser, server["url"])
    _choose_model(browser, "cc")
    _fill(browser, precision="fp32", sampler="ddim", steps=3, n=2, seed=5, class_labels=2)
    browser.find_element(By.ID, "generate").click()
    (panel,) = _panel_done(browser)

    assert panel["state"].startswith("Succeeded"), panel
    assert [img["width"] for img in panel["images"]] == [8, 8]  # decoded PNGs of the model's size
    figures = browser.find_elements(By.CSS_SELECTOR, ".panel .grid figure")
    assert all(f.find_element(By.TAG_NAME, "img").is_displayed() for f in figures)  # on screen
    assert [f.get_attribute("data-class-label") for f in figures] == ["2", "2"]
    assert [f.find_element(By.CLASS_NAME, "class-name").text for f in figures] == ["2 · fox"] * 2
    assert panel["meta"]["classes"] == "2 · fox, 2 · fox"
    job = _recorded(server, panel)
    assert (job["model"], job["seeds"], job["class_labels"]) == ("cc", [5, 6], [2, 2])

    # "random": the page sends no label, so the worker draws each image's from its seed (and the page shows it)
    _fill(browser, class_labels="")
    browser.find_element(By.ID, "generate").click()
    (drawn,) = _panel_done(browser)
    assert drawn["state"].startswith("Succeeded"), drawn
    expected = [default_class_label(seed, CLASSES) for seed in (5, 6)]
    assert _recorded(server, drawn)["class_labels"] == expected
    assert drawn["meta"]["classes"] == ", ".join(f"{c} · {CLASS_NAMES[c]}" for c in expected)
    assert _console_errors(browser) == []


@needs_conditional_models
def test_the_comparison_sends_the_same_class_to_both(browser, server):
    from selenium.webdriver.common.by import By

    _open(browser, server["url"])
    _choose_model(browser, "cc")
    _fill(browser, precision="w8a8", sampler="ddim", steps=3, n=2, seed=11, class_labels=3)
    browser.find_element(By.ID, "compare").click()
    _panel_done(browser)
    _wait(browser, "document.querySelector('.compare .panel:last-child .summary').textContent")
    fp, q = _panel_done(browser)
    jobs = [_recorded(server, panel) for panel in (fp, q)]
    assert [(j["precision"], j["seeds"], j["class_labels"]) for j in jobs] == [
        ("fp32", [11, 12], [3, 3]), ("w8a8", [11, 12], [3, 3])]
    for panel in (fp, q):
        assert panel["state"].startswith("Succeeded") and [i["width"] for i in panel["images"]] == [8, 8], panel
        assert panel["meta"]["classes"] == "3 · owl, 3 · owl"
    assert _console_errors(browser) == []


@needs_conditional_models
def test_a_prompt_is_sent_to_both_sides_of_the_comparison(browser, server):
    from selenium.webdriver.common.by import By

    _open(browser, server["url"])
    _choose_model(browser, "sd")
    # no prompt: the API's 422 is shown next to the prompt field
    _fill(browser, precision="fp32", steps=3, n=1, seed=2)
    browser.find_element(By.ID, "generate").click()
    _wait(browser, "!document.querySelector('#errors').hidden")
    assert browser.find_element(By.ID, "prompt-error").text == "required for a text-to-image model"
    assert browser.find_element(By.ID, "prompt").get_attribute("aria-invalid") == "true"

    _fill(browser, precision="w8a8", prompt="a red fox", negative_prompt="blurry", guidance_scale=5)
    browser.find_element(By.ID, "compare").click()
    _panel_done(browser)
    _wait(browser, "document.querySelector('.compare .panel:last-child .summary').textContent")
    fp, q = _panel_done(browser)
    jobs = [_recorded(server, panel) for panel in (fp, q)]
    assert [(j["precision"], j["seeds"], j["prompt"], j["negative_prompt"], j["guidance_scale"], j["class_labels"])
            for j in jobs] == [(p, [2], "a red fox", "blurry", 5.0, None) for p in ("fp32", "w8a8")]
    for panel in (fp, q):
        assert panel["state"].startswith("Succeeded") and [i["width"] for i in panel["images"]] == [8], panel
        assert (panel["meta"]["prompt"], panel["meta"]["negative prompt"]) == ("a red fox", "blurry")
    assert re.match(r"PSNR vs fp32, same seeds: ", q["summary"]), q["summary"]
    assert [m for m in _console_errors(browser) if "status of 422" not in m] == []
