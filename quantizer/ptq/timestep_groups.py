"""Time-step-aware activation scales: one set of activation ranges per group of diffusion time-steps.

PTQ4DM's core observation is that activation ranges move with the time-step; one range per tensor must then
cover the noise end and the image end at once, and near x_0 (where the model's input is almost clean and the
remaining noise is small) one 8-bit step of that shared range is as large as the signal the UNet must resolve
(docs/SENSITIVITY.md). Splitting [0, T) into G contiguous groups and calibrating activation ranges per group
keeps the paper's per-tensor scales inside each group. Weights are quantized once, identically for every group.

Groups are fixed in diffusion time (not in sampler steps), so one calibration serves every sampler and step
count: a step at time-step t runs with the ranges of the group holding t. A batch whose images sit in different
groups (the sampler never does this; the calibration forward can) is split by group and reassembled.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from quantizer.ptq.calibration import CalibrationSet

GROUP_PREFIX = "timestep_group"


def group_edges(num_train_timesteps: int, groups: int) -> list[int]:
    """Lower edges of G equal groups of [0, T): group g holds edges[g] <= t < edges[g + 1] (or T)."""
    if groups < 1 or groups > num_train_timesteps:
        raise ValueError(f"timestep_groups must be in 1..{num_train_timesteps}, got {groups}")
    return [round(g * num_train_timesteps / groups) for g in range(groups)]


def group_index(timesteps: torch.Tensor, edges: Sequence[int]) -> torch.Tensor:
    """The group of each time-step (a LongTensor shaped like `timesteps`)."""
    bounds = torch.tensor(list(edges[1:]), dtype=torch.float64)
    return torch.bucketize(timesteps.detach().to("cpu", torch.float64), bounds, right=True)


def split_calibration(calibration: CalibrationSet, edges: Sequence[int]) -> list[CalibrationSet]:
    """The calibration set cut by group; every group must get samples (else its ranges would be guesses)."""
    groups = group_index(calibration.ts, edges)
    parts = [calibration.subset(groups == g) for g in range(len(edges))]
    if empty := [g for g, part in enumerate(parts) if len(part) == 0]:
        raise ValueError(f"timestep groups {empty} get no calibration samples (edges {list(edges)}); calibrate "
                         "over the whole trajectory (method 'uniform') or use fewer timestep_groups")
    return parts


WEIGHT_KEY = ".weight_quantizer."


def pack(group_stats: Sequence[dict[str, torch.Tensor]], edges: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-group stats as one flat dict (the calibration cache's format). The groups share their weights, so
    the weight entries (scales, and GPTQ's integers: a byte per weight) are stored once, with group 0."""
    packed = {f"{GROUP_PREFIX}.edges": torch.tensor(list(edges), dtype=torch.int64)}
    for g, stats in enumerate(group_stats):
        packed.update({f"{GROUP_PREFIX}.{g}.{key}": value for key, value in stats.items()
                       if g == 0 or WEIGHT_KEY not in key})
    return packed


def unpack(packed: dict[str, torch.Tensor]) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    edges = [int(e) for e in packed[f"{GROUP_PREFIX}.edges"]]
    group_stats: list[dict[str, torch.Tensor]] = [{} for _ in edges]
    prefix = f"{GROUP_PREFIX}."
    for key, value in packed.items():
        group, _, rest = key.removeprefix(prefix).partition(".")
        if key.startswith(prefix) and group.isdigit():
            group_stats[int(group)][rest] = value
    if any(not stats for stats in group_stats):
        raise ValueError(f"grouped stats miss groups: {[g for g, s in enumerate(group_stats) if not s]}")
    shared = {k: v for k, v in group_stats[0].items() if WEIGHT_KEY in k}
    for stats in group_stats[1:]:  # entries packed before the weights were stored once carry their own copy
        for key, value in shared.items():
            stats.setdefault(key, value)
    return group_stats, edges


def is_grouped(stats: dict[str, torch.Tensor]) -> bool:
    return f"{GROUP_PREFIX}.edges" in stats


def share_weights(unet: nn.Module) -> nn.Module:
    """A copy of `unet` whose parameters are the same tensors (only buffers such as scales are copied)."""
    return copy.deepcopy(unet, memo={id(p): p for p in unet.parameters()})


class TimestepGroupedUNet(nn.Module):
    """G UNets (one per time-step group) called like one: unet(x_t, t).sample.

    The members are fake-quant UNets sharing their weights, or what an execution backend built from them (one
    compiled graph per group).
    """

    def __init__(self, members: Sequence[nn.Module], edges: Sequence[int], float_member: nn.Module | None = None,
                 float_groups_by_steps: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__()
        if len(members) != len(edges) or not members:
            raise ValueError(f"one member per group: {len(members)} members for {len(edges)} groups")
        if float_groups_by_steps and float_member is None:
            raise ValueError("float_groups_by_steps needs the float member its extra groups run")
        self.members = nn.ModuleList(members)
        self.edges = list(edges)
        self.float_member = float_member
        self.float_groups_by_steps = tuple(float_groups_by_steps)
        self.config = members[0].config
        self._views: dict[int, TimestepGroupedUNet] = {}

    def for_steps(self, steps: int) -> TimestepGroupedUNet:
        """The members a request of `steps` sampler steps runs (QuantConfig.float_groups_by_steps): the last groups
        handed to the float member when it takes that many steps, else this UNet itself. sample() calls it."""
        groups = max((g for min_steps, g in self.float_groups_by_steps if steps >= min_steps), default=0)
        kept = len(self.members) - groups
        if all(member is self.float_member for member in self.members[kept:]):
            return self  # those groups run the float member already
        if groups not in self._views:
            self._views[groups] = TimestepGroupedUNet([*self.members[:kept], *[self.float_member] * groups],
                                                      self.edges).eval()
        return self._views[groups]

    def _distinct(self) -> list[nn.Module]:
        """Every module that runs some group, once (the float member may serve several, or only for_steps views)."""
        found = {id(m): m for m in [*self.members, *([self.float_member] if self.float_member is not None else [])]}
        return list(found.values())

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self.members[0], "dtype", torch.float32)

    @property
    def device(self) -> torch.device:
        return getattr(self.members[0], "device", torch.device("cpu"))

    @property
    def backend(self) -> str:
        return getattr(self.members[0], "backend", "fake")  # fake-quant members have no backend of their own

    def map(self, build: Callable[[nn.Module], nn.Module]) -> TimestepGroupedUNet:
        """The same groups with every member replaced by build(member) (e.g. compiled by a backend); a member
        serving several groups (the float one) is built once."""
        built = {id(member): build(member) for member in self._distinct()}
        float_member = None if self.float_member is None else built[id(self.float_member)]
        return TimestepGroupedUNet([built[id(member)] for member in self.members], self.edges, float_member,
                                   self.float_groups_by_steps)

    def warmup(self, batch_sizes: Iterable[int] = (1,)) -> dict[int, float]:
        sizes = list(batch_sizes)
        seconds: dict[int, float] = dict.fromkeys(sizes, 0.0)
        for member in self._distinct():
            if hasattr(member, "warmup"):
                for size, s in member.warmup(sizes).items():
                    seconds[size] = seconds.get(size, 0.0) + s
        return seconds

    def weight_bytes(self) -> int:
        from quantizer.execution.executor import weight_bytes

        members = self._distinct()
        if all(hasattr(m, "weight_bytes") and callable(m.weight_bytes) for m in members):
            return sum(weight_bytes(m) for m in members)  # compiled graphs each hold their weights
        return weight_bytes(self.members[0])  # fake-quant members share their parameters

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, return_dict: bool = True,
                **kwargs: object) -> UNet2DOutput | tuple[torch.Tensor]:
        t = torch.as_tensor(timestep)
        flat = t.reshape(-1)
        groups = group_index(flat, self.edges)
        if flat.numel() == 1 or bool((groups == groups[0]).all()):
            out = self.members[int(groups[0])](sample, timestep, **kwargs).sample
        else:
            if flat.numel() != sample.shape[0]:
                raise ValueError(f"timestep must be one value or one per image ({sample.shape[0]}), got "
                                 f"{flat.numel()}")
            parts = [((groups == g).nonzero().flatten(), g) for g in groups.unique().tolist()]
            outs = [self.members[g](sample[rows], flat[rows].to(t.device), **_rows_of(kwargs, rows)).sample
                    for rows, g in parts]
            out = outs[0].new_empty((sample.shape[0], *outs[0].shape[1:]))
            for (rows, _), part in zip(parts, outs, strict=True):
                out[rows] = part
        return UNet2DOutput(sample=out) if return_dict else (out,)


def _rows_of(kwargs: dict[str, object], rows: torch.Tensor) -> dict[str, object]:
    """The per-image keyword inputs (class labels, text embeddings) of the images in `rows`; anything else as is."""
    out = dict(kwargs)
    for name in ("class_labels", "encoder_hidden_states"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] > 1:
            out[name] = value[rows.to(value.device)]
    return out
