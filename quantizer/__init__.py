"""PTQ4DM: post-training quantization of diffusion models, and the diffusion core it calibrates on."""

__version__ = "0.1.0"

from quantizer import quiet as _quiet

_quiet.install()  # before anything imports diffusers (and with it torchao): see quantizer.quiet
