"""Drop four known-harmless log records that torchao's import prints, so a start shows only what a user can act on.

diffusers imports torchao as soon as any diffusers model is imported (its quantizer registry does, whenever torchao
is installed), so ptq4dm's own lazy torchao import cannot avoid these; each is matched exactly, on the logger that
emits it, and nothing else from these libraries is hidden:

* torchao: "Failed to load .../torchao/_C_mxfp8*.so" and "..._C_cutlass_*.so". PyPI's torchao wheel carries these
  CUDA kernels (MX formats, Hopper CUTLASS), which link against libtorch_cuda and cannot load into a CPU torch build;
  the int8-x86 backend runs on inductor/oneDNN and never uses them. Only dropped when torch has no CUDA.
* torchao.kernel.intmm: "Warning: Detected no triton, on systems without Triton certain kernels will not work":
  Triton kernels are GPU kernels; a CPU torch build never has Triton. Only dropped when torch has no CUDA.
* torch.utils._pytree: "<enum ...> is an Enum subclass ... register_constant() on Enum subclasses is deprecated",
  for torchao's own enums (torchao 0.18 still registers them; torch 2.13 no longer needs it).
* diffusers: "Unable to import `torchao` Tensor objects": diffusers 0.42 looks for torchao.dtypes.NF4Tensor, which
  torchao 0.18 moved; it only matters for loading torchao-serialized checkpoints, which ptq4dm never loads.
"""

from __future__ import annotations

import logging
import re

_TORCHAO_CUDA_KERNEL = re.compile(r"Failed to load \S*/torchao/_C_(mxfp8|cutlass_\w+)[^/\s]*\.so: ")
_NO_TRITON = "Warning: Detected no triton"
_PYTREE_ENUM = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
_DIFFUSERS_TORCHAO = "Unable to import `torchao` Tensor objects."


def _cpu_only_torch() -> bool:
    import torch  # already imported: torchao logs these while importing itself, after torch

    return torch.version.cuda is None


def _torchao_kernels(record: logging.LogRecord) -> bool:
    return not (_TORCHAO_CUDA_KERNEL.match(record.getMessage()) and _cpu_only_torch())


def _torchao_triton(record: logging.LogRecord) -> bool:
    return not (str(record.msg).startswith(_NO_TRITON) and _cpu_only_torch())


def _torchao_enums(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    owner = getattr(args[0], "__module__", "") if args else ""
    return not (str(record.msg).startswith(_PYTREE_ENUM) and owner.split(".")[0] == "torchao")


def _diffusers_torchao(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_DIFFUSERS_TORCHAO)


_FILTERS = {
    "torchao": _torchao_kernels,
    "torchao.kernel.intmm": _torchao_triton,
    "torch.utils._pytree": _torchao_enums,
    "diffusers.quantizers.torchao.torchao_quantizer": _diffusers_torchao,
}


def install() -> None:
    """Attach the filters to the exact loggers that emit those records (idempotent); before diffusers is imported."""
    for name, check in _FILTERS.items():
        logger = logging.getLogger(name)
        if check not in logger.filters:
            logger.addFilter(check)
