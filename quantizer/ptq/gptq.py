"""GPTQ weight rounding (Frantar et al., ICLR 2023) for 4-bit weights: minimise each layer's output error.

Rounding every weight to its nearest grid point minimises the error of the weights, not of the layer's output.
GPTQ rounds one input column at a time on the layer's fixed per-channel grid and spreads that column's rounding
error over the columns not yet rounded, weighted by the inverse of H = E[x x^T] over the layer's calibration
inputs (im2col patches for a convolution). It needs one forward pass and a Cholesky factorisation per layer, no
training: a cheaper stand-in for AdaRound/BRECQ reconstruction, measured beside it in docs/RESULTS.md.
The scales are PTQ4DM's own (searched before); only the integers change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from quantizer.ptq.fake_quant import QRange

# Rows (patches) kept per layer and calibration batch: enough to estimate H for the widest layer here
# (128 channels x 3 x 3 = 1152 inputs), bounded so a batch's im2col never has to be multiplied in full.
MAX_ROWS_PER_BATCH = 4096
DAMPING = 0.01  # of mean(diag H), added to the diagonal: keeps the factorisation stable for rarely used inputs
BLOCK = 128  # columns updated lazily together (the algorithm's result does not depend on it)


class InputHessian:
    """Accumulates X^T X over the rows of a Conv2d's / Linear's inputs (a seeded random subset per batch)."""

    def __init__(self, layer: nn.Module, seed: int, max_rows: int = MAX_ROWS_PER_BATCH) -> None:
        self.layer, self.max_rows = layer, max_rows
        self.generator = torch.Generator().manual_seed(seed)
        n = layer.weight[0].numel()
        self.xtx = torch.zeros(n, n, dtype=torch.float64)
        self.rows = 0

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # B x n x L
            return patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return x.reshape(-1, x.shape[-1])

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        rows = self.rows_of(x.detach().float().cpu())
        if rows.shape[0] > self.max_rows:
            rows = rows[torch.randint(0, rows.shape[0], (self.max_rows,), generator=self.generator)]
        self.xtx += rows.double().T @ rows.double()
        self.rows += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise RuntimeError("no inputs were seen for this layer")
        return self.xtx / self.rows


def supports(layer: nn.Module) -> bool:
    """Grouped convolutions mix only some inputs per output: their im2col H would be wrong; they round to nearest."""
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)


@contextlib.contextmanager
def recording(layers: dict[str, nn.Module], wrappers: dict[str, nn.Module], seed: int = 0
              ) -> Iterator[dict[str, InputHessian]]:
    """While open, every forward of wrappers[name] feeds the inputs of layers[name] into its InputHessian."""
    hessians = {name: InputHessian(layers[name], seed + i) for i, name in enumerate(layers)}
    handles = [wrappers[name].register_forward_pre_hook(lambda _m, args, h=hessians[name]: h.update(args[0]))
               for name in layers]
    try:
        yield hessians
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def gptq_round(weight: torch.Tensor, scale: torch.Tensor, qrange: QRange, hessian: torch.Tensor,
               damping: float = DAMPING, act_order: bool = True) -> torch.Tensor:
    """Integer weights (int8 tensor of weight's shape) on the symmetric grid `scale` (one per output channel).

    act_order: round the inputs with the largest diag(H) first (they matter most, and get the least error pushed
    onto them), as GPTQ's reference code does for 4-bit weights.
    """
    w = weight.detach().double().reshape(weight.shape[0], -1).clone()
    s = scale.detach().double().reshape(-1, 1)
    n = w.shape[1]
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter; round to nearest
    h[dead, dead] = 1.0
    h += damping * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, order], h[order][:, order]
    # Upper Cholesky factor of H^-1: row i holds how column i's error propagates to the columns after it.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty_like(w)
    for start in range(0, n, BLOCK):
        end = min(start + BLOCK, n)
        block, errors = w[:, start:end].clone(), torch.empty(w.shape[0], end - start, dtype=w.dtype)
        for i in range(end - start):
            column = block[:, i]
            rounded = torch.clamp(torch.round(column / s[:, 0]), qrange.qmin, qrange.qmax)
            q[:, start + i] = rounded
            error = (column - rounded * s[:, 0]) / u[start + i, start + i]
            block[:, i:] -= error[:, None] * u[start + i, start:end][i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ u[start:end, end:]
    out = torch.empty_like(q)
    out[:, order] = q
    return out.reshape(weight.shape).to(torch.int8)
