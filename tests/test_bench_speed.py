"""Smoke test of bench/speed.py's measuring and reporting code on the tiny model (no inductor variants: fast).

Why: the benchmark is run by hand for docs/BENCHMARKS.md; this keeps `--variants` and the per-image summary working.
"""

from __future__ import annotations

import argparse

import pytest

pytest_plugins = ["service.testing"]


def test_selected_variants_are_timed_and_reported_per_image(tiny_model_dir, monkeypatch, tmp_path):
    from bench.speed import bench_model, render
    from quantizer.diffusion.models import load_model

    monkeypatch.chdir(tmp_path)  # the benchmark's calibration cache goes under ./runs
    model = load_model(str(tiny_model_dir))
    report = bench_model(model, [1, 2], repeats=1, gen_repeats=0, rss={},
                         only={"fp32 eager", "int8 fake", "int8 openvino"})

    assert [(r["batch"], r["variant"]) for r in report.rows] == [
        (1, "fp32 eager"), (1, "int8 fake"), (1, "int8 openvino"),
        (2, "fp32 eager"), (2, "int8 fake"), (2, "int8 openvino")]
    assert all(r["unet_ms"] > 0 and r["gen_s"] is None for r in report.rows)
    text = render([report], argparse.Namespace(repeats=1, gen_repeats=0))
    assert "Batch 2: int8 openvino is " in text and "converted once, compiled for this batch size" in text
    for variant in ("fp32 eager", "int8 fake", "int8 openvino"):
        rows = [r for r in report.rows if r["variant"] == variant]
        per_image = ", ".join(f"{r['unet_ms'] / r['batch']:.2f} at batch {r['batch']}" for r in rows)
        assert f"Per image, {variant}: {per_image}" in text


def test_unknown_variant_is_rejected_by_name(capsys):
    from bench.speed import main

    with pytest.raises(SystemExit) as exc:
        main(["--variants", "int8 real,int9 real"])
    assert exc.value.code == 2
    assert "--variants: unknown int9 real" in capsys.readouterr().err
