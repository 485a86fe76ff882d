"""bench/float_formats.py computes the FP UNet from rounded layer inputs and weights only inside its window, and its
report compares the seeds it names with their own references.

Why: its lines are read as "a 16-bit path at the noise end keeps (or loses) these images"; rounding that leaked
outside the window, or a report against other seeds, would say so of the wrong thing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bench.float_formats import WindowedFormatUNet, main, parse_window
from bench.quality import save_uint8_batch
from quantizer.diffusion.images import to_uint8
from quantizer.diffusion.models import load_model
from quantizer.diffusion.sampling import sample
from quantizer.evaluation.evaluate import samples_cache_dir
from quantizer.evaluation.metrics import psnr

pytest_plugins = ["service.testing"]


def test_layers_read_rounded_inputs_and_weights_only_inside_the_window(tiny_unet):
    unet = WindowedFormatUNet(tiny_unet, "fp16", (500, 1000))
    seen: list[torch.Tensor] = []
    first = next(m for m in unet.low.modules() if isinstance(m, nn.Conv2d))
    first.register_forward_hook(lambda _, args, __: seen.append(args[0]))
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inside, outside = unet(x, torch.tensor(800)).sample, unet(x, torch.tensor(100)).sample
        fp_800, fp_100 = tiny_unet(x, 800).sample, tiny_unet(x, 100).sample
    assert torch.equal(outside, fp_100)
    assert torch.equal(seen[0], x.half().float()) and not torch.equal(seen[0], x)
    assert all(torch.equal(m.weight, m.weight.half().float()) for m in unet.low.modules() if isinstance(m, nn.Conv2d))
    rel = ((inside - fp_800).norm() / fp_800.norm()).item()
    assert 0 < rel < 5e-3  # fp16 rounds at 2^-11: a small error, not none and not another image


def test_bad_window_names_the_option():
    assert parse_window("250:1000") == (250, 1000)
    for bad in ("500", "a:b", "900:100"):
        with pytest.raises(ValueError, match="--windows"):
            parse_window(bad)


def test_report_compares_each_seed_with_its_reference(tiny_model_dir, tmp_path, capsys):
    model = load_model(tiny_model_dir)
    fp = to_uint8(sample(model.unet, model.scheduler_config, list(range(4)), "ddim", 25))
    references = tmp_path / "references"
    save_uint8_batch(samples_cache_dir(references, model, "fp32-uint8", "ddim", 25), range(4), fp)
    low = to_uint8(sample(WindowedFormatUNet(model.unet, "bf16", (0, 1000)), model.scheduler_config,
                          list(range(4)), "ddim", 25))
    expected = np.minimum(psnr(fp, low), 100.0)

    main(["--steps", "25", "--n", "4", "--control", "4", "--formats", "bf16", "--windows", "0:1000", "--batch", "4",
          "--model", str(tiny_model_dir), "--references-dir", str(references)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| fp32", "| bf16"))]
    control, bf16 = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)
    assert control[3] == "100.0"  # the harness reproduces the references
    assert float(bf16[3]) == pytest.approx(expected.mean(), abs=0.051)
    assert bf16[5] == f"{expected.min():.1f} ({int(np.argmin(expected))})"


def test_every_output_stores_each_layers_output_in_the_format(tiny_unet):
    unet = WindowedFormatUNet(tiny_unet, "bf16", (0, 1000), every_output=True)
    outputs: list[torch.Tensor] = []
    norm = next(m for m in unet.low.modules() if isinstance(m, nn.GroupNorm))
    norm.register_forward_hook(lambda _, __, out: outputs.append(out))  # runs after the rounding hook
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unet(x, torch.tensor(300))
    assert torch.equal(outputs[0], outputs[0].bfloat16().float())
    assert torch.equal(norm.weight, norm.weight.bfloat16().float())


def test_named_seeds_get_their_own_psnrs(tiny_model_dir, tmp_path, capsys):
    model = load_model(tiny_model_dir)
    seeds = [3, 1]
    fp = to_uint8(sample(model.unet, model.scheduler_config, seeds, "ddim", 25))
    references = tmp_path / "references"
    for seed, image in zip(seeds, fp, strict=True):
        save_uint8_batch(samples_cache_dir(references, model, "fp32-uint8", "ddim", 25), range(seed, seed + 1),
                         image[None])
    low = to_uint8(sample(WindowedFormatUNet(model.unet, "bf16", (0, 1000)), model.scheduler_config, seeds,
                          "ddim", 25))
    expected = np.minimum(psnr(fp, low), 100.0)

    main(["--steps", "25", "--seeds", "3,1", "--control", "0", "--formats", "bf16", "--windows", "0:1000",
          "--model", str(tiny_model_dir), "--references-dir", str(references)])
    out = capsys.readouterr().out
    assert "| run | seed 3 | seed 1 |" in out
    line = next(line for line in out.splitlines() if line.startswith("| bf16, 0 <= t < 1000 |"))
    assert [float(v) for v in line.strip("|").split("|")[1:]] == pytest.approx(expected.tolist(), abs=0.051)


def test_bad_seed_list_names_the_option(capsys):
    with pytest.raises(SystemExit):
        main(["--seeds", "3,x"])
    assert "--seeds wants a comma list of integers" in capsys.readouterr().err


def test_split_bf16_is_far_closer_than_bf16_and_not_exact(tiny_unet):
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp = tiny_unet(x, 700).sample
        errors = {fmt: ((WindowedFormatUNet(tiny_unet, fmt, (0, 1000))(x, torch.tensor(700)).sample - fp).norm()
                        / fp.norm()).item() for fmt in ("bf16", "fp16", "bf16x3")}
    assert 0 < errors["bf16x3"] < errors["fp16"] / 4 < errors["bf16"] / 4
    with pytest.raises(ValueError, match="every-output"):
        WindowedFormatUNet(tiny_unet, "bf16x3", (0, 1000), every_output=True)


def test_forward_errors_are_each_formats_distance_from_fp(tiny_model_dir, capsys):
    from bench.float_formats import forward_errors

    model = load_model(tiny_model_dir)
    forward_errors(model.unet, model.scheduler_config, ["bf16", "bf16x3"], [0, 1], every_output=False)
    rows = {int(line.split("|")[1]): [float(v.strip().rstrip("%")) for v in line.split("|")[2:4]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()}
    assert sorted(rows) == [200, 400, 600, 800]
    xs: dict[int, torch.Tensor] = {}
    sample(model.unet, model.scheduler_config, [0, 1], "ddim", 20,
           callback=lambda i, n, t, x: xs.setdefault(int(t), x.clone()))
    with torch.no_grad():
        fp = model.unet(xs[600], torch.tensor(600)).sample
        low = WindowedFormatUNet(model.unet, "bf16", (0, 1000))(xs[600], torch.tensor(600)).sample
    assert rows[600][0] == pytest.approx(100 * float((low - fp).norm() / fp.norm()), abs=5e-5)
    assert 0 < rows[600][1] < rows[600][0] / 10
