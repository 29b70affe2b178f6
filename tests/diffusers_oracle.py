"""diffusers' models built from our configs: the oracles our UNet and VAE are held against.

The tests use them through tiny_pipeline.py and directly. They are built in tools/diffusers_models.py,
which tools/bench.py uses too (a tool does not import tests/).
"""

from tools.diffusers_models import diffusers_unet, diffusers_vae  # noqa: F401
