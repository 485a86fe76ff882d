"""Where OpenVINO spends a UNet forward: our int8 graph against NNCF's, per runtime op type (PERF_COUNT).

Why: with fp32 float ops NNCF's model runs faster than ours at the same 65 int8 layers (docs/BENCHMARKS.md); this
says which kernels make the difference. A third variant adds FakeQuantize nodes on every block output (the
residual stream that feeds GroupNorm, the skip adds and the up-block concats; ranges = observed min/max, so its
numbers are speed only, not a quantization we ship) to measure how much of the gap int8 data between blocks
closes. A fourth makes every layer input's range symmetric about zero (the same FakeQuantize nodes with zero
point 128 on the u8 grid, which the runtime lowers to i8 without a zero-point; speed only, the ranges widen): how
much of the gap the activation zero-points cost. Static batch, the same hints for all, interleaved repeats.

    pip install 'nncf==3.4.0'; python bench/openvino_profile.py --batch 16
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import cifar_model, quantized  # noqa: E402  (the speed table's models and W8A8 quantization)

from quantizer.diffusion.models import load_model  # noqa: E402
from quantizer.execution.openvino import FakeQuantizedLayer, convert, traceable_quantized  # noqa: E402
from quantizer.ptq.calibration import build_calibration_set  # noqa: E402
from quantizer.ptq.config import CalibrationConfig  # noqa: E402

BLOCK_OUTPUTS = ("ResnetBlock2D", "Attention", "Downsample2D", "Upsample2D")


def quantize_block_outputs(unet: nn.Module, xs: torch.Tensor, ts: torch.Tensor) -> int:
    """Add an 8-bit fake-quantize (min/max of the outputs on xs, ts) after every block; returns how many."""
    targets = [(name, m) for name, m in unet.named_modules() if type(m).__name__ in BLOCK_OUTPUTS]
    ranges: dict[str, tuple[float, float]] = {}

    def observe(name: str):
        def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
            lo, hi = ranges.get(name, (0.0, 0.0))
            ranges[name] = (min(lo, float(out.min())), max(hi, float(out.max())))
        return hook

    def fake_quantize(name: str):
        lo, hi = ranges[name]
        scale = (hi - lo) / 255
        zero_point = round(-lo / scale)
        return lambda _m, _i, out: torch.fake_quantize_per_tensor_affine(out, scale, zero_point, 0, 255)

    handles = [m.register_forward_hook(observe(name)) for name, m in targets]
    with torch.no_grad():
        for i in range(0, len(xs), 32):
            unet(xs[i:i + 32], ts[i:i + 32])
    for handle in handles:
        handle.remove()
    for name, m in targets:
        m.register_forward_hook(fake_quantize(name))
    return len(targets)


def symmetric_activations(unet: nn.Module) -> int:
    """Widen every layer input's range to be symmetric about zero (zero point 128 of 0..255); returns how many."""
    count = 0
    for module in unet.modules():
        if isinstance(module, FakeQuantizedLayer):
            widened = []
            for scale, zero_point in module.act_qparams:
                half = max(zero_point, 255 - zero_point) * scale  # the larger side of [lo, hi] about zero
                widened.append((half / 127, 128))  # [-128, 127] steps: the positive side still reaches half
            module.act_qparams = widened
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("builtin", "cifar"), default="builtin")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="f32", help="OpenVINO INFERENCE_PRECISION_HINT")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--top", type=int, default=10, help="op types listed per variant")
    args = parser.parse_args(argv)
    import nncf
    import openvino as ov

    torch.set_num_threads(2)
    model = cifar_model() if args.model == "cifar" else load_model(None)
    calib = build_calibration_set(model.unet, model.scheduler_config,
                                  CalibrationConfig(method="uniform", n_samples=128, steps=25, batch_size=32, seed=1),
                                  progress=False)
    fit = [(calib.xs[i:i + 1].numpy(), calib.ts[i:i + 1].numpy()) for i in range(96)]
    ours = traceable_quantized(quantized(model).unet)
    extended = traceable_quantized(quantized(model).unet)
    n_blocks = quantize_block_outputs(extended, calib.xs[:96], calib.ts[:96])
    symmetric = traceable_quantized(quantized(model).unet)
    n_symmetric = symmetric_activations(symmetric)
    graphs = {
        "ptq4dm scales": convert(ours),
        f"ptq4dm scales + {n_blocks} block outputs int8 (speed only)": convert(extended),
        f"ptq4dm scales, {n_symmetric} layer inputs symmetric (speed only)": convert(symmetric),
        "nncf default": nncf.quantize(convert(model.unet), nncf.Dataset(fit, lambda item: list(item)),
                                      subset_size=len(fit)),
    }
    core = ov.Core()
    x = np.ascontiguousarray(calib.xs[96:96 + args.batch].numpy())
    t = np.ascontiguousarray(calib.ts[96:96 + args.batch].numpy())
    requests = {}
    for label, graph in graphs.items():
        graph.reshape({graph.inputs[0]: list(x.shape), graph.inputs[1]: [len(t)]})
        compiled = core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": args.precision,
                                                     "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
        requests[label] = compiled.create_infer_request()
        requests[label].infer([x, t])
    times: dict[str, list[float]] = {label: [] for label in requests}
    per_op: dict[str, Counter] = {label: Counter() for label in requests}
    order, rng = list(requests), random.Random(0)
    for _ in range(args.repeats):
        rng.shuffle(order)  # a fresh order each repeat: no variant always runs after the same one
        for label in order:
            request = requests[label]
            begin = time.perf_counter()
            request.infer([x, t])
            times[label].append(time.perf_counter() - begin)
            for info in request.profiling_info:
                per_op[label][f"{info.node_type} ({info.exec_type})"] += info.real_time.total_seconds() / args.repeats
    # Nodes that ran in one forward: at batch 1 a node's fixed cost is a visible share of the time.
    executed: dict[str, int] = {}
    reorders: dict[str, int] = {}
    for label, request in requests.items():
        ran = [info.node_type for info in request.profiling_info if info.status.name == "EXECUTED"]
        executed[label], reorders[label] = len(ran), ran.count("Reorder")
    ours_ms = statistics.median(times["ptq4dm scales"]) * 1e3
    print(f"Command: `python bench/openvino_profile.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
          f"OpenVINO {ov.get_version()}, NNCF {nncf.__version__}, {args.model} UNet, batch {args.batch}, "
          f"float ops {args.precision}, "
          f"{args.repeats} interleaved repeats (medians)\n")
    print("| variant | UNet fwd ms | x ours | nodes run (reorders) | top op types, ms per forward (kernel) |")
    print("|---|---|---|---|---|")
    for label, series in times.items():
        ms = statistics.median(series) * 1e3
        top = "; ".join(f"{op} {s * 1e3:.1f}" for op, s in per_op[label].most_common(args.top))
        print(f"| {label} | {ms:.1f} | {ms / ours_ms:.2f}x | {executed[label]} ({reorders[label]}) | {top} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
