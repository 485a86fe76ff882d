"""Fake-quant layers: Conv2d/Linear wrappers and a diffusers attention processor with quantized matmuls.

Every quantizer keeps its parameters (scale, zero_point, bits) in buffers, so they move with .to(), appear in
state_dict() and can be exported, cached and loaded without a calibration pass. Each module is in one of
three modes: 'fp' (pass-through), 'observe' (full-precision math, layer inputs recorded) and 'quant'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from quantizer.ptq.fake_quant import (
    RESIDUAL_RANGE,
    QRange,
    act_range,
    channel_view,
    fake_quantize,
    residual_step,
    weight_range,
)

MODES: tuple[str, ...] = ("fp", "observe", "quant")
# At most this many values are drawn from any one batch of activations.
MAX_VALUES_PER_BATCH = 2**17


class NonFiniteActivation(ValueError):
    """A layer input seen during calibration holds NaN/inf; `rows` are the offending indices along dim 0."""

    def __init__(self, layer: str, rows: list[int], batch: int) -> None:
        self.layer, self.rows, self.batch = layer, rows, batch
        super().__init__(f"non-finite values (NaN/inf) in the input of layer {layer!r} during calibration")


class ActObserver:
    """Statistics of one activation tensor over a calibration run: exact min/max plus a bounded random sample.

    Batches are combined so that each contributes equally: every batch gives a uniform random subsample
    (with replacement) of `per_batch` values (all of them if it has fewer), and the kept chunks form a
    reservoir (Algorithm R over chunks) holding at most cap // per_batch of them, so every batch is equally
    likely to be represented whatever the order. quantize_ picks per_batch = cap / n_batches, which keeps
    every batch. Min/max are exact over all values, so the search never loses the true range.
    """

    def __init__(self, cap: int, per_batch: int, seed: int, name: str = "?") -> None:
        self.name = name
        self.per_batch = max(1, min(per_batch, cap, MAX_VALUES_PER_BATCH))
        self.max_chunks = max(1, cap // self.per_batch)
        self.generator = torch.Generator().manual_seed(seed)
        self.chunks: list[torch.Tensor] = []
        self.batches_seen = 0
        self.lo = float("inf")
        self.hi = float("-inf")

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        if not bool(torch.isfinite(flat).all()):  # a NaN would poison min/max and the search silently
            rows = x.detach().reshape(x.shape[0], -1) if x.ndim > 1 else flat[:, None]
            bad = (~torch.isfinite(rows)).any(1).nonzero().flatten().tolist()
            raise NonFiniteActivation(self.name, bad, rows.shape[0])
        lo, hi = torch.aminmax(flat)
        self.lo, self.hi = min(self.lo, lo.item()), max(self.hi, hi.item())
        if flat.numel() > self.per_batch:
            idx = torch.randint(0, flat.numel(), (self.per_batch,), generator=self.generator)
            chunk = flat[idx.to(flat.device)]
        else:
            chunk = flat.clone()
        self.batches_seen += 1
        if len(self.chunks) < self.max_chunks:
            self.chunks.append(chunk)
        else:
            slot = int(torch.randint(0, self.batches_seen, (1,), generator=self.generator))
            if slot < self.max_chunks:
                self.chunks[slot] = chunk

    def values(self) -> torch.Tensor:
        if not self.chunks:
            raise RuntimeError("observer saw no activations")
        return torch.cat(self.chunks)


class WeightQuantizer(nn.Module):
    """Symmetric per-output-channel weight quantizer; scale has the weight's broadcast shape, e.g. (C_out,1,1,1)."""

    def __init__(self, weight: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.qrange: QRange = weight_range(bits)
        shape = (weight.shape[0], *([1] * (weight.ndim - 1)))
        self.register_buffer("scale", torch.ones(shape, dtype=torch.float32, device=weight.device))
        self.register_buffer("bits", torch.tensor(bits, dtype=torch.int32, device=weight.device))

    def set_scale(self, scale: torch.Tensor) -> None:
        self.scale.copy_(channel_view(scale, self.scale.ndim).to(self.scale))

    def hold_rounded(self, weight: torch.Tensor) -> None:
        """Keep the integer weights a rounding method chose (GPTQ) as a buffer, so they are exported, cached and
        loaded with the scales; QuantLayer.apply_rounded writes them into the layer."""
        self.register_buffer("rounded", torch.zeros(weight.shape, dtype=torch.int8, device=weight.device))

    def sync(self) -> None:
        """Re-derive the python-side grid from the `bits` buffer (after loading buffers)."""
        self.qrange = weight_range(int(self.bits))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight.float(), self.scale, 0, self.qrange).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"bits={int(self.bits)}, channels={self.scale.shape[0]}, symmetric"


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer (uint grid, integer zero_point).

    residual: add a second 8-bit pass over what the first left, x ~ q(x) + q_r(x - q(x)) (RESIDUAL_RANGE, step
    residual_step(scale)): the input on a ~16-bit grid that 8-bit kernels still run, as two passes summed
    (QuantConfig.float_group_mode 'residual'). A property of how a member runs, not of its statistics.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.qrange: QRange = act_range(bits)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("bits", torch.tensor(bits, dtype=torch.int32))
        self.mode = "fp"
        self.residual = False
        self.observer: ActObserver | None = None

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(()))
        self.zero_point.copy_(zero_point.reshape(()).round().to(torch.int32))

    def sync(self) -> None:
        self.qrange = act_range(int(self.bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant":
            zero_point = self.zero_point.to(torch.float32)
            q = fake_quantize(x.float(), self.scale, zero_point, self.qrange)
            if self.residual:
                q = q + fake_quantize(x.float() - q, residual_step(self.scale), 0, RESIDUAL_RANGE)
            return q.to(x.dtype)
        if self.mode == "observe":
            if self.observer is None:
                raise RuntimeError("ActQuantizer in observe mode without an observer")
            self.observer.update(x)
        return x

    def extra_repr(self) -> str:
        return f"bits={int(self.bits)}, mode={self.mode}" + (", residual" if self.residual else "")


def run_residual(unet: nn.Module) -> nn.Module:
    """Give every activation quantizer of a fake-quant UNet its residual pass (ActQuantizer.residual); returns it."""
    for module in unet.modules():
        if isinstance(module, ActQuantizer):
            module.residual = True
    return unet


class SplitActQuantizer(nn.Module):
    """The input of a layer fed a channel concat [x[:, :split], x[:, split:]]: one per-tensor quantizer per half.

    Why: a skip connection concatenates the decoder's features with the encoder's, whose ranges differ widely;
    one range sized for the wider half leaves the other a few levels (Q-Diffusion). Each half is an ordinary
    ActQuantizer (`first`, `second`), so calibration, the range search, export and loading treat it as one more
    tensor; `split` (channels in the first half) is exported with them. Integer kernels run the layer as two
    convolutions summed (quantizer.execution.openvino).
    """

    def __init__(self, bits: int, split: int) -> None:
        super().__init__()
        if split < 1:
            raise ValueError(f"split must be a positive channel count, got {split}")
        self.first = ActQuantizer(bits)
        self.second = ActQuantizer(bits)
        self.register_buffer("split", torch.tensor(split, dtype=torch.int64))

    @property
    def mode(self) -> str:
        return self.first.mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self.first.mode = self.second.mode = mode

    @property
    def qrange(self) -> QRange:
        return self.first.qrange

    @property
    def bits(self) -> torch.Tensor:
        return self.first.bits

    def sync(self) -> None:
        """Nothing of its own to re-derive (the halves sync themselves)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "fp":
            return x
        k = int(self.split)
        return torch.cat([self.first(x[:, :k]), self.second(x[:, k:])], dim=1)

    def extra_repr(self) -> str:
        return f"split={int(self.split)}"


class QuantLayer(nn.Module):
    """Wraps a Conv2d/Linear: quantizes its input (per tensor) and its weight (per output channel).

    The bias stays in float (an integer kernel adds it in the int32 accumulator at scale s_x * s_w).
    The fake-quantized weight is computed once when entering 'quant' mode and held in a non-persistent buffer.
    """

    def __init__(self, layer: nn.Module, weight_bits: int, act_bits: int) -> None:
        super().__init__()
        self.layer = layer
        self.weight_quantizer = WeightQuantizer(layer.weight, weight_bits)
        self.input_quantizer = ActQuantizer(act_bits).to(layer.weight.device)
        self.register_buffer("qweight", None, persistent=False)
        self.mode = "fp"

    @torch.no_grad()
    def apply_rounded(self) -> None:
        """Replace the float weight by the held integers times their scales (a no-op without them): every backend
        then reads weights already on the grid, and rounding them to nearest again gives the same integers."""
        rounded = getattr(self.weight_quantizer, "rounded", None)
        if rounded is not None:
            weight = self.layer.weight
            weight.copy_((rounded.float() * self.weight_quantizer.scale).to(weight.dtype))

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.input_quantizer.mode = mode
        with torch.no_grad():
            self.qweight = self.weight_quantizer(self.layer.weight) if mode == "quant" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        weight = self.qweight if self.mode == "quant" else self.layer.weight
        return self._run(x, weight)

    def _run(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class QuantConv2d(QuantLayer):
    def _run(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.layer._conv_forward(x, weight, self.layer.bias)  # keeps the layer's padding mode


class QuantLinear(QuantLayer):
    def _run(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.layer.bias)


class QuantAttnProcessor(nn.Module):
    """diffusers attention processor (same math as AttnProcessor) with quantized matmul operands.

    q and k are quantized before q.k^T, the softmax probabilities and v before probs.v, each per tensor.
    The projections (to_q/to_k/to_v/to_out) are ordinary Linear layers, quantized as QuantLinear.
    Installed with Attention.set_processor; being an nn.Module it registers as the Attention's submodule.
    """

    def __init__(self, act_bits: int) -> None:
        super().__init__()
        self.query_quantizer = ActQuantizer(act_bits)
        self.key_quantizer = ActQuantizer(act_bits)
        self.probs_quantizer = ActQuantizer(act_bits)
        self.value_quantizer = ActQuantizer(act_bits)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        for quantizer in (self.query_quantizer, self.key_quantizer, self.probs_quantizer, self.value_quantizer):
            quantizer.mode = mode

    # Explicit signature: Attention.forward filters keyword arguments by inspecting processor.__call__.
    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: object) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                attention_mask: torch.Tensor | None, temb: torch.Tensor | None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = self.query_quantizer(attn.head_to_batch_dim(query))
        key = self.key_quantizer(attn.head_to_batch_dim(key))
        value = self.value_quantizer(attn.head_to_batch_dim(value))
        probs = self.probs_quantizer(attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
