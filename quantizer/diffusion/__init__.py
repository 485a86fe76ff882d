"""The diffusion runtime: loading diffusers models, DDPM/DDIM sampling, images out."""
