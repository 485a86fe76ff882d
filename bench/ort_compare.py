"""The int8 route decision: ONNX Runtime QDQ vs PT2E + inductor (what quantizer.execution.int8_x86 uses), same run.

Why: the issue left the x86 int8 route open ("pick by measurement"). ONNX Runtime can run QDQ int8 models with
externally supplied scales (TensorQuantOverrides); PT2E lowers to oneDNN through inductor. This script times
both on the same UNet and batch, interleaved, next to bf16 compiled:

    pip install onnxruntime onnx onnxscript    # not dependencies of the project
    python bench/ort_compare.py --model cifar --batch 16

ORT's int8 model is built by onnxruntime.quantization.quantize_static (QDQ, per-channel int8 weights, uint8
activations, the same operator set: Conv, Gemm/MatMul) calibrated with min-max on a few random inputs: speed does
not depend on the scale values, so its qparams are not PTQ4DM's here (they could be, via TensorQuantOverrides).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from speed import build_variants, cifar_model, time_interleaved  # bench/ is the script's directory

from quantizer.diffusion.models import load_model
from quantizer.execution.int8_x86 import UNetForward


def ort_int8_session(unet: torch.nn.Module, batch: int, workdir: Path, threads: int):  # noqa: ANN201
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    channels = int(unet.config.in_channels)
    x = torch.randn(batch, channels, 32, 32)
    t = torch.tensor(500)
    fp32_path, pre_path, int8_path = workdir / "unet.onnx", workdir / "unet.pre.onnx", workdir / "unet.int8.onnx"
    torch.onnx.export(UNetForward(unet).eval(), (x, t), str(fp32_path), input_names=["sample", "timestep"],
                      output_names=["eps"], opset_version=17, dynamo=False)
    quant_pre_process(str(fp32_path), str(pre_path))
    # The same operator set as PTQ4DM / int8-x86: convolutions and weight matmuls; attention's q.k and attn.v
    # (MatMul of two activations) stay float.
    graph = onnx.load(str(pre_path)).graph
    weights = {init.name for init in graph.initializer}
    activation_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and not weights & set(n.input)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"sample": torch.randn(batch, channels, 32, 32).numpy(),
                                "timestep": np.array(tt, dtype=np.int64)} for tt in (100, 500, 900)])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    quantize_static(str(pre_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "Gemm", "MatMul"], nodes_to_exclude=activation_matmuls)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    feed = {"sample": x.numpy(), "timestep": np.array(500, dtype=np.int64)}
    return lambda: session.run(None, feed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("builtin", "cifar"), default="cifar")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    model = cifar_model() if args.model == "cifar" else load_model(None)
    channels = int(model.unet.config.in_channels)
    x = torch.randn(args.batch, channels, 32, 32)
    t = torch.tensor(500)
    fns = {}
    for label in ("fp32 eager", "bf16 compiled", "int8 real"):
        unet = build_variants(model, args.batch, only=label)[0][label]
        fns[f"{label} (torch)"] = lambda u=unet: u(x, t)
    with tempfile.TemporaryDirectory() as tmp:
        fns["int8 ORT QDQ"] = ort_int8_session(model.unet, args.batch, Path(tmp), torch.get_num_threads())
        with torch.no_grad():
            medians = time_interleaved(fns, args.repeats)
    base = medians["fp32 eager (torch)"]
    print(f"`python bench/ort_compare.py {' '.join(sys.argv[1:])}`, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved repeats (medians)\n")
    print(f"| {model.name}, batch {args.batch} | ms | x fp32 eager |\n|---|---|---|")
    for label, med in medians.items():
        print(f"| {label} | {med * 1e3:.1f} | {base / med:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
