"""PTQ4DM: post-training quantization of diffusion models, and the diffusion core it calibrates on."""

__version__ = "0.1.0"
