"""The names of SDXL's original (single-file, SGM) layout and ours (diffusers'), as tables of rules.

A `Rule` says which start of a source name becomes which start of ours; `convert_weights.py` applies
them to every tensor of a checkpoint (`map_weights`), and formats/lora.py's kohya-ss files, whose module
names follow the original UNet, go the other way (`source_name`). The transform names of `inner`
renames ("copy", "linear", "transpose", "q", "k", "v") are convert_weights.TRANSFORMS'. Standard
library only: the rules need the configs' sizes, not torch.
"""

from typing import NamedTuple


class Rule(NamedTuple):
    """Source keys starting with `source` go to `component` (None: dropped) with `source` replaced by
    `target`; `inner` renames the start of the rest: fragment -> ((new fragment, transform), ...)."""

    source: str
    component: str | None
    target: str = ""
    inner: dict = {}


def renames(table: dict[str, str], transform: str = "copy") -> dict:
    return {old: ((new, transform),) for old, new in table.items()}


UNET_RESNET = renames({"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
                       "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."})
VAE_RESNET = renames({"nin_shortcut.": "conv_shortcut."})
VAE_ATTENTION = renames(
    {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}, "linear"
)
OPENCLIP_LAYER = {
    **renames({"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.",
               "attn.out_proj.": "self_attn.out_proj."}),
    **{f"attn.in_proj_{kind}": tuple((f"self_attn.{p}_proj.{kind}", p) for p in "qkv")
       for kind in ("weight", "bias")},
}


def unet_rules(config: "UNetConfig", prefix: str = "model.diffusion_model.") -> list[Rule]:
    """The original UNet's names (STYLE.md's table, for any number of levels and resnets per level)."""
    per_level, levels = config.layers_per_block + 1, len(config.block_out_channels)
    pairs = [("time_embed.0.", "time_embedding.linear_1.", {}), ("time_embed.2.", "time_embedding.linear_2.", {}),
             ("label_emb.0.0.", "add_embedding.linear_1.", {}), ("label_emb.0.2.", "add_embedding.linear_2.", {}),
             ("input_blocks.0.0.", "conv_in.", {}), ("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET),
             ("middle_block.1.", "mid_block.attentions.0.", {}),
             ("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET),
             ("out.0.", "conv_norm_out.", {}), ("out.2.", "conv_out.", {})]
    for level, depth in enumerate(config.transformer_layers_per_block):
        first = 1 + per_level * level
        for i in range(config.layers_per_block):
            block = f"input_blocks.{first + i}."
            pairs.append((f"{block}0.", f"down_blocks.{level}.resnets.{i}.", UNET_RESNET))
            pairs += [(f"{block}1.", f"down_blocks.{level}.attentions.{i}.", {})] if depth else []
        if level < levels - 1:
            downsampler = f"input_blocks.{first + config.layers_per_block}.0.op."
            pairs.append((downsampler, f"down_blocks.{level}.downsamplers.0.conv.", {}))
    for up, depth in enumerate(reversed(config.transformer_layers_per_block)):
        for i in range(per_level):
            block = f"output_blocks.{per_level * up + i}."
            pairs.append((f"{block}0.", f"up_blocks.{up}.resnets.{i}.", UNET_RESNET))
            pairs += [(f"{block}1.", f"up_blocks.{up}.attentions.{i}.", {})] if depth else []
        if up < levels - 1:
            upsampler = f"output_blocks.{per_level * up + per_level - 1}.{2 if depth else 1}.conv."
            pairs.append((upsampler, f"up_blocks.{up}.upsamplers.0.conv.", {}))
    return [Rule(prefix + source, "unet", target, inner) for source, target, inner in pairs]


def vae_rules(config: "VAEConfig", prefix: str = "first_stage_model.") -> list[Rule]:
    """The original VAE's names; its decoder numbers levels from the lowest resolution up."""
    levels = len(config.block_out_channels)
    pairs = [("", "", {}), ("encoder.norm_out.", "encoder.conv_norm_out.", {}),
             ("decoder.norm_out.", "decoder.conv_norm_out.", {})]
    for coder in ("encoder", "decoder"):
        pairs += [(f"{coder}.mid.block_1.", f"{coder}.mid_block.resnets.0.", VAE_RESNET),
                  (f"{coder}.mid.block_2.", f"{coder}.mid_block.resnets.1.", VAE_RESNET),
                  (f"{coder}.mid.attn_1.", f"{coder}.mid_block.attentions.0.", VAE_ATTENTION)]
    for level in range(levels):
        down, up = f"encoder.down.{level}.", f"decoder.up.{levels - 1 - level}."
        pairs += [(f"{down}block.{i}.", f"encoder.down_blocks.{level}.resnets.{i}.", VAE_RESNET)
                  for i in range(config.layers_per_block)]
        pairs += [(f"{up}block.{i}.", f"decoder.up_blocks.{level}.resnets.{i}.", VAE_RESNET)
                  for i in range(config.layers_per_block + 1)]
        if level < levels - 1:
            pairs += [(f"{down}downsample.conv.", f"encoder.down_blocks.{level}.downsamplers.0.conv.", {}),
                      (f"{up}upsample.conv.", f"decoder.up_blocks.{level}.upsamplers.0.conv.", {})]
    return [Rule(prefix + source, "vae", target, inner) for source, target, inner in pairs]


def clip_rules(component: str, model: "nn.Module", prefix: str) -> list[Rule]:
    """CLIP ViT-L in transformers' names, with or without the `text_model.` level."""
    return [Rule(prefix, component, ""), Rule(prefix + "text_model.", component, text_prefix(model)),
            Rule(prefix + "embeddings.position_ids", None),
            Rule(prefix + "text_model.embeddings.position_ids", None)]


def open_clip_rules(model: "nn.Module", prefix: str = "conditioner.embedders.1.model.") -> list[Rule]:
    """OpenCLIP ViT-bigG: fused attention projections, a transposed text projection."""
    text = text_prefix(model)
    rules = [Rule(prefix + "token_embedding.", "text_encoder_2", text + "embeddings.token_embedding."),
             Rule(prefix + "positional_embedding", "text_encoder_2", text + "embeddings.position_embedding.weight"),
             Rule(prefix + "ln_final.", "text_encoder_2", text + "final_layer_norm."),
             Rule(prefix + "text_projection", "text_encoder_2", "text_projection.weight", {"": (("", "transpose"),)}),
             Rule(prefix + "logit_scale", None)]
    return rules + [
        Rule(f"{prefix}transformer.resblocks.{i}.", "text_encoder_2", f"{text}encoder.layers.{i}.", OPENCLIP_LAYER)
        for i in range(model.config.num_hidden_layers)
    ]


def single_file_rules(models: dict[str, "nn.Module"]) -> list[Rule]:
    """Every rule of an original single-file SDXL checkpoint, for models of these configs; without a
    UNet model (the UNet comes from --video-unet) the file's UNet is left out."""
    unet = unet_rules(models["unet"].config) if "unet" in models else [Rule("model.diffusion_model.", None)]
    return [*unet, *vae_rules(models["vae"].config),
            *clip_rules("text_encoder", models["text_encoder"], "conditioner.embedders.0.transformer."),
            *open_clip_rules(models["text_encoder_2"]), Rule("denoiser.sigmas", None)]



def text_prefix(model: "nn.Module") -> str:
    """Where transformers keeps the text transformer: CLIPTextModel is flat since transformers 5.6."""
    return "text_model." if hasattr(model, "text_model") else ""



def source_name(name: str, rules: list[Rule]) -> str | None:
    """The source name that `rules` map onto our `name` (a module or a parameter), or None: the
    inverse of convert_weights.map_weights for renames that copy. The rule with the longest
    `target` that starts `name` (at a dot) is used, its `inner` renames undone."""
    candidates = [rule for rule in rules if rule.component and (name + ".").startswith(rule.target)]
    if not candidates:
        return None
    rule = max(candidates, key=lambda rule: len(rule.target))
    rest = (name + ".")[len(rule.target):]
    for old, news in rule.inner.items():
        for new, transform in news:
            if transform == "copy" and rest.startswith(new):
                return (rule.source + old + rest[len(new):]).removesuffix(".")
    return (rule.source + rest).removesuffix(".")
