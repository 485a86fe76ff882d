"""bench/openvino_bf16_output.py measures what OpenVINO's CPU plugin returns for a convolution of bf16 operands.

Why: docs/RESULTS.md rests on its answer (the bf16 output drops a split-bf16 product's lo parts); the harness must
compare with the fp32 sum of the same rounded operands, and OpenVINO (pinned) must still answer as documented.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import torch

from bench.openvino_bf16_output import bf16, bf16_conv_graph, main, relative


def test_reported_distances_are_the_outputs(capsys):
    main(["--channels", "16"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): float(line.split("|")[2].strip().rstrip("%"))
            for line in out.splitlines() if line.startswith(("| f32", "| bf16"))}
    rng = np.random.default_rng(0)  # the script's own draw
    x = rng.standard_normal((1, 16, 16, 16)).astype(np.float32)
    w = (rng.standard_normal((16, 16, 3, 3)) * 0.05).astype(np.float32)
    exact = torch.nn.functional.conv2d(torch.from_numpy(bf16(x)), torch.from_numpy(bf16(w)), padding=1).numpy()
    y = ov.Core().compile_model(bf16_conv_graph(w, [1, 16, 16, 16]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})([x])[0]
    assert rows["f32"] == round(100 * relative(y, exact), 3)
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        # as documented for CPUs with bf16 kernels: the output is bf16, not the fp32 sum (~1e-5% away)
        assert rows["f32"] >= 0.5 * 100 * relative(bf16(exact), exact)
