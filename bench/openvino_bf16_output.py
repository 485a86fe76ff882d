"""Does OpenVINO's CPU plugin sum a convolution of bf16 operands into an fp32 output?

Why: a split-bf16 noise end (`bf16x3` in bench/float_formats.py: x_hi W_hi + x_hi W_lo + x_lo W_hi) keeps the
images only if each product reaches the sum in fp32; a bf16 output drops the lo products. In OpenVINO's IR a
Convolution's output has its inputs' type, so the graph here asks for fp32 the only way the IR can, a Convert after
it, and the result is compared with the fp32 sum of the same rounded operands (and with that sum rounded to bf16).

    python bench/openvino_bf16_output.py
"""

from __future__ import annotations

import argparse

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import torch


def bf16(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a).bfloat16().float().numpy()


def bf16_conv_graph(weight: np.ndarray, shape: list[int]) -> ov.Model:
    """f32 input -> Convert(bf16) -> Convolution with bf16 weights (3x3, padding 1) -> Convert(f32)."""
    x = ops.parameter(shape, ov.Type.f32)
    w = ops.convert(ops.constant(weight, ov.Type.f32), ov.Type.bf16)
    conv = ops.convolution(ops.convert(x, ov.Type.bf16), w, [1, 1], [1, 1], [1, 1], [1, 1])
    return ov.Model([ops.convert(conv, ov.Type.f32)], [x])


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=64)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, args.channels, 16, 16)).astype(np.float32)
    w = (rng.standard_normal((args.channels, args.channels, 3, 3)) * 0.05).astype(np.float32)
    exact = torch.nn.functional.conv2d(torch.from_numpy(bf16(x)), torch.from_numpy(bf16(w)), padding=1).numpy()
    print(f"OpenVINO {ov.get_version()}, a {args.channels}-channel 3x3 convolution of bf16-rounded operands; "
          f"its fp32 sum rounded to bf16 is {100 * relative(bf16(exact), exact):.3f}% from the fp32 sum\n")
    print("| precision hint | output's distance from the fp32 sum | convolution's runtime precision |")
    print("|---|---|---|")
    core = ov.Core()
    for hint in ("f32", "bf16"):
        compiled = core.compile_model(bf16_conv_graph(w, list(x.shape)), "CPU", {"INFERENCE_PRECISION_HINT": hint})
        y = compiled([x])[0]
        runtime = [op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ops()
                   if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
        print(f"| {hint} | {100 * relative(y, exact):.3f}% | {', '.join(runtime)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
