"""Time from `ptq4dm serve` to ready, as a new user meets it: README command 1 with no settings.

Why: the first contact is the main job; it must show the quantized model within about a minute (target: /readyz
200 within 90 s on a 2-core machine, not counting pip). Each run starts the real console script with an empty,
private calibration cache and compile cache (so only what ships with the model counts), polls /readyz, and then
asks for one PNG of every served precision through the README's curl request.

    python bench/startup.py                  # 3 cold starts; prints a markdown table
    python bench/startup.py --runs 1 --precisions fp32,w8a8,w4a8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError:
        return 0, {}


def png(port: int, precision: str) -> bytes:
    body = json.dumps({"seed": 42, "sampler": "ddim", "steps": 50, "precision": precision}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", data=body, method="POST",
                                     headers={"Accept": "image/png", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return r.read()


def one_start(command: list[str], timeout_s: float) -> dict:
    port = free_port()
    scratch = Path(tempfile.mkdtemp(prefix="ptq4dm-startup-"))
    env = {**os.environ, "PTQ4DM_CALIBRATION_CACHE_DIR": str(scratch / "calibration"),
           "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor")}
    env.pop("PTQ4DM_OPENVINO_CACHE_DIR", None)
    log = (scratch / "serve.log").open("w")
    start = time.monotonic()
    proc = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    result: dict = {"ready_s": None, "all_ready_s": None}
    try:
        while time.monotonic() - start < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}: {(scratch / 'serve.log').read_text()}")
            status, body = readyz(port)
            now = time.monotonic() - start
            if status == 200 and result["ready_s"] is None:
                result["ready_s"] = now
            models = body.get("models") or {}
            if models and all(m["state"] == "ready" for m in models.values()):
                result["all_ready_s"], result["models"] = now, models
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"not ready after {timeout_s} s: {body}")
        result["png_bytes"] = {}
        for key in result["models"]:
            image = png(port, key.rsplit("/", 1)[1])
            if not image.startswith(PNG_MAGIC):
                raise RuntimeError(f"{key}: not a PNG")
            result["png_bytes"][key] = len(image)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--precisions", default=None, help="PTQ4DM_PRECISIONS (default: the server's default)")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    if args.precisions:
        os.environ["PTQ4DM_PRECISIONS"] = args.precisions
    script = shutil.which("ptq4dm")
    command = [script, "serve"] if script else [sys.executable, "-m", "service.cli", "serve"]
    runs = [one_start(command, args.timeout) for _ in range(args.runs)]
    print(f"Command: `python bench/startup.py {' '.join(sys.argv[1:])}` ({os.cpu_count()} cores)\n")
    print("| run | /readyz 200 s | every precision ready s | PNG bytes per precision |")
    print("|---|---|---|---|")
    for i, r in enumerate(runs, 1):
        pngs = ", ".join(f"{k} {v}" for k, v in r["png_bytes"].items())
        print(f"| {i} | {r['ready_s']:.1f} | {r['all_ready_s']:.1f} | {pngs} |")
    print(f"\nMedian: /readyz 200 after {statistics.median(r['ready_s'] for r in runs):.1f} s, every precision "
          f"ready after {statistics.median(r['all_ready_s'] for r in runs):.1f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
