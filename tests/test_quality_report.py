"""bench/quality.py's stored state: the committed rows behind docs/RESULTS.md and the committed FP references.

Why: the report's rows and its DDPM-1000 FP images take hours of this CPU each; both used to live only under
runs/, which a new machine does not have, so a later `--render` would have emptied the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_committed_rows_render_to_the_committed_report():
    from bench.quality import READING_MARKER, RESULTS_JSON, render

    results = json.loads((ROOT / RESULTS_JSON).read_text())
    report = (ROOT / "docs" / "RESULTS.md").read_text()
    assert READING_MARKER in report
    assert render(results) + "\n" == report.split(READING_MARKER)[0], "re-run: python bench/quality.py --render"


def test_a_run_of_another_n_is_refused_on_a_store_of_n_2000(tmp_path, capsys):
    """Row keys hold no N: a `--n 250` side check would otherwise skip or mix in among the report's rows."""
    from bench.quality import RESULTS_JSON, main

    with pytest.raises(SystemExit) as exc:
        main(["--n", "250", "--results", str(ROOT / RESULTS_JSON), "--out", str(tmp_path / "R.md")])
    assert exc.value.code == 2
    assert "--n 250 differs from the N=[2000]" in capsys.readouterr().err
    assert not (tmp_path / "R.md").exists()


def test_uint8_batches_round_trip_and_a_short_file_is_skipped(tmp_path, capsys):
    from bench.quality import load_uint8_batches, save_uint8_batch

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    save_uint8_batch(tmp_path, range(0, 3), images[:3])
    save_uint8_batch(tmp_path, range(3, 5), images[3:])
    np.savez_compressed(tmp_path / "seeds-5-9.npz", images=np.zeros((2, 4, 4, 1), np.uint8))  # 2 images, 5 seeds

    loaded = load_uint8_batches(tmp_path)
    assert sorted(loaded) == list(range(5))
    assert all(np.array_equal(loaded[seed], images[seed]) for seed in range(5))
    assert "seeds-5-9.npz: 2 images for seeds 5..9, skipped" in capsys.readouterr().err


@pytest.mark.usefixtures("builtin_model_dir")
def test_fp_reference_is_stored_per_batch_and_reused_without_sampling(tmp_path):
    from bench.quality import Evaluator, variants
    from quantizer.diffusion.images import to_uint8
    from quantizer.diffusion.sampling import sample

    evaluator = Evaluator(n=3, batch_size=2, samples_root=tmp_path / "samples", forward_batch=2,
                          references=tmp_path / "references")
    calls = []
    evaluator.model.unet.register_forward_hook(lambda *args: calls.append(1))

    first = evaluator.reference("ddim", 2)
    assert len(calls) == 2 * 2  # two batches (seeds 0-1, 2) x two steps
    stored = sorted(p.name for p in (tmp_path / "references").rglob("*.npz"))
    assert stored == ["seeds-0-1.npz", "seeds-2-2.npz"]
    model = evaluator.model
    expected = to_uint8(sample(model.unet, model.scheduler_config, [0, 1, 2], sampler="ddim", steps=2))
    assert first.dtype == np.uint8 and np.array_equal(first, expected)

    calls.clear()  # the float samples behind the store stay in runs/samples: a row resumed there says so
    x, info = evaluator.samples(variants()[0], "eager", "ddim", 2)
    assert calls == [] and info["cached_seeds"] == 3 and np.array_equal(to_uint8(x), first)

    calls.clear()
    fresh = Evaluator(n=3, batch_size=2, samples_root=tmp_path / "other-samples", forward_batch=2,
                      references=tmp_path / "references")
    fresh.model.unet.register_forward_hook(lambda *args: calls.append(1))
    assert np.array_equal(fresh.reference("ddim", 2), first)
    assert calls == []  # read from the store: no UNet forward


def test_a_row_running_the_same_unets_is_copied_under_its_label_and_no_other():
    """`faithful` at DDPM-1000 runs fp32 for t >= 250, exactly the `faithful fp32 t>=250` row's UNets: the 2.2 h of
    sampling behind that row are its numbers too. At DDIM-25 the two run different graphs and nothing is copied."""
    from bench.quality import RESULTS_JSON, same_unets_row, variants

    results = json.loads((ROOT / RESULTS_JSON).read_text())
    by_label = {v.label: v for v in variants()}
    source = results["ddpm1000|w8a8 faithful fp32 t>=250|openvino"]
    copied = same_unets_row(results, by_label["w8a8 faithful"], "openvino", "ddpm1000")
    assert copied is not None and copied["same_unets_as"] == "w8a8 faithful fp32 t>=250"
    assert copied["label"] == "w8a8 faithful" and copied["overrides"] == {"preset": "faithful"}
    assert (copied["fd"], copied["psnr_min"]) == (source["fd"], source["psnr_min"])
    assert same_unets_row(results, by_label["w8a8 faithful"], "openvino", "ddim25") is None  # t >= 500 there
    assert same_unets_row(results, by_label["w8a8 faithful fp32 t>=250"], "openvino", "ddim25") is None
    assert same_unets_row(results, by_label["w8a8 faithful"], "int8-x86", "ddpm1000") is None  # other kernels
