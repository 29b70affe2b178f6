"""diffusers' UNet and VAE built from our configs (random weights): the references that
tests/diffusers_oracle.py holds our models against and that tools/bench.py compares with. diffusers
is a test dependency (requirements-dev.txt), not a run-time one: it is imported inside each function,
so this module imports without it and only a call needs it.
"""

from model import UNetConfig
from vae import VAEConfig


def diffusers_unet(config: UNetConfig):
    """diffusers' UNet2DConditionModel with the spatial layers of `config` (no temporal modules)."""
    from diffusers import UNet2DConditionModel

    depths = config.transformer_layers_per_block
    return UNet2DConditionModel(
        sample_size=config.sample_size,
        block_out_channels=config.block_out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)),
        layers_per_block=config.layers_per_block,
        transformer_layers_per_block=tuple(max(d, 1) for d in depths),
        attention_head_dim=tuple(c // config.head_dim for c in config.block_out_channels),  # heads
        cross_attention_dim=config.cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=config.addition_time_embed_dim,
        projection_class_embeddings_input_dim=config.pooled_text_dim + 6 * config.addition_time_embed_dim,
        norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps,
        use_linear_projection=True,
    )


def diffusers_vae(config: VAEConfig):
    """diffusers' AutoencoderKL with the layers of `config`."""
    from diffusers import AutoencoderKL

    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        latent_channels=config.latent_channels,
        scaling_factor=config.scaling_factor,
        force_upcast=config.force_upcast,
    )
