"""Static-shape vs dynamic-batch OpenVINO graphs of the same converted model: speed per forward and compile time.

Why: quantizer/execution/openvino.py compiles a static-shape graph per batch size it meets (bounded LRU) from one
conversion with a dynamic batch dimension; this is the measurement behind that choice. With static shapes the
CPU plugin fuses the element-wise chains (the FakeQuantize nodes included) into JIT subgraphs and drops the
run-time shape arithmetic of GroupNorm's reshapes.

    python bench/openvino_static.py                     # built-in W8A8 (paper preset), batch 1,4,16,32
    python bench/openvino_static.py --precision fp32 --batches 16
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import time_interleaved  # noqa: E402  (bench/'s interleaved timing)

from quantizer.diffusion.models import load_model  # noqa: E402
from quantizer.execution.openvino import convert, runtime_layers, traceable_quantized  # noqa: E402
from quantizer.ptq.pipeline import quantize_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="w8a8", help="fp32 or a quantized precision (shipped/cached stats)")
    parser.add_argument("--float-precision", default="f32", choices=("f32", "bf16"),
                        help="OpenVINO's INFERENCE_PRECISION_HINT for the ops left in float")
    parser.add_argument("--batches", default="1,4,16,32")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    import openvino as ov

    model = load_model(None)
    unet = model.unet if args.precision == "fp32" else traceable_quantized(
        quantize_model(model, args.precision, cache_dir="runs/calibration-cache", progress=False).unet)
    converted = convert(unet)
    channels, size = int(model.unet.config.in_channels), int(model.unet.config.sample_size)
    core, config = ov.Core(), {"INFERENCE_PRECISION_HINT": args.float_precision, "PERFORMANCE_HINT": "LATENCY"}
    calls, compile_s, kinds = {}, {}, {}
    for batch in (int(b) for b in args.batches.split(",")):
        x = np.random.default_rng(0).standard_normal((batch, channels, size, size), dtype=np.float32)
        t = np.full((batch,), 500, dtype=np.int64)
        for static in (False, True):
            graph = converted.clone()
            if static:
                graph.reshape({graph.inputs[0]: [batch, channels, size, size], graph.inputs[1]: [batch]})
            start = time.perf_counter()
            compiled = core.compile_model(graph, "CPU", config)
            key = (batch, "static" if static else "dynamic")
            compile_s[key] = time.perf_counter() - start
            kinds[key] = Counter(kind for _, kind, _ in runtime_layers(compiled))
            request = compiled.create_infer_request()
            request.infer([x, t])
            calls[key] = lambda request=request, x=x, t=t: request.infer([x, t])
    # interleaved in a fresh random order each repeat: a noisy neighbour slows every variant alike, and no graph
    # always runs after the same one (bench/speed.py's time_interleaved)
    medians = time_interleaved(calls, args.repeats)
    print(f"{args.precision}, float ops {args.float_precision}, torch {torch.__version__}, OpenVINO "
          f"{ov.get_version()}, {args.repeats} interleaved repeats (medians)\n")
    print("| batch | dynamic ms | static ms | static speed-up | static compile s | JIT subgraphs (static) | "
          "FakeQuantize left (dynamic / static) |")
    print("|---|---|---|---|---|---|---|")
    for batch in sorted({b for b, _ in calls}):
        dyn, sta = (medians[(batch, k)] * 1e3 for k in ("dynamic", "static"))
        print(f"| {batch} | {dyn:.1f} | {sta:.1f} | {dyn / sta:.2f}x | {compile_s[(batch, 'static')]:.2f} | "
              f"{kinds[(batch, 'static')]['Subgraph']} | {kinds[(batch, 'dynamic')]['FakeQuantize']} / "
              f"{kinds[(batch, 'static')]['FakeQuantize']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
