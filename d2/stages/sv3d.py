"""SV3D_p: diffusers' spatio-temporal UNet with per-frame camera conditioning.

SV3D_p (Stability AI) is SVD's UNet fine-tuned to generate an orbit of views. Its vector
conditioning ("adm", width 1280) is, per frame (= per view), the concatenation of the
sinusoidal embeddings of

    cond_aug   (``addition_time_embed_dim`` = 256 wide)
    polar_rad  ((adm - 256) / 2 = 512 wide), polar = 90 deg - elevation
    azimuth_rad (512 wide), azimuth of the view relative to the input view, in (0, 2 pi]

Stock diffusers adds one vector per *batch element* before repeating it over the frames;
:class:`SV3DUNet` keeps the parent's modules and weights names (so a diffusers-layout
folder loads with ``from_pretrained``) and overrides ``forward`` to add one embedding per
frame after the repeat. Its config is the parent's config: ``addition_time_embed_dim`` is
the cond_aug width and ``projection_class_embeddings_input_dim`` the whole adm width.

:func:`convert_sgm_unet_state_dict` maps Stability's original key layout
(``model.diffusion_model.input_blocks.1.0.in_layers.0.weight``, ...) onto this module's
keys; :func:`to_sgm_unet_state_dict` is its exact inverse (used by the tests and to
write a checkpoint in Stability's layout).
"""

from __future__ import annotations

import re

import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.embeddings import Timesteps
from torch import Tensor

SGM_UNET_PREFIX = "model.diffusion_model."


class SV3DUNet(UNetSpatioTemporalConditionModel):
    """UNetSpatioTemporalConditionModel with per-frame added ids ``[B, T, 3]`` = (cond_aug, polar, azimuth)."""

    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 8,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "DownBlockSpatioTemporal",
        ),
        up_block_types: tuple[str, ...] = (
            "UpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        addition_time_embed_dim: int = 256,
        projection_class_embeddings_input_dim: int = 1280,
        layers_per_block: int | tuple[int] = 2,
        cross_attention_dim: int | tuple[int] = 1024,
        transformer_layers_per_block: int | tuple = 1,
        num_attention_heads: int | tuple[int, ...] = (5, 10, 20, 20),
        num_frames: int = 21,
    ) -> None:
        # same signature as the parent (diffusers reads config keys from it); defaults = SV3D_p
        super().__init__(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            down_block_types=down_block_types, up_block_types=up_block_types,
            block_out_channels=block_out_channels, addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block, num_attention_heads=num_attention_heads,
            num_frames=num_frames,
        )
        cond_dim = self.config.addition_time_embed_dim
        cam_total = self.config.projection_class_embeddings_input_dim - cond_dim
        if cam_total <= 0 or cam_total % 2:
            raise ValueError(
                "SV3DUNet needs projection_class_embeddings_input_dim = cond_aug width + 2 * camera width, got "
                f"{self.config.projection_class_embeddings_input_dim} with addition_time_embed_dim {cond_dim}"
            )
        self.camera_embed_dim = cam_total // 2
        # parameter-free sinusoidal embedding of polar / azimuth angles (cos first, like sgm)
        self.add_camera_proj = Timesteps(self.camera_embed_dim, True, downscale_freq_shift=0)

    def embed_added_ids(self, added_time_ids: Tensor) -> Tensor:
        """[B, T, 3] (cond_aug, polar_rad, azimuth_rad) -> [B * T, adm] sinusoidal features."""
        b, t, n = added_time_ids.shape
        if n != 3:
            raise ValueError(f"SV3DUNet expects added_time_ids [B, T, 3], got {tuple(added_time_ids.shape)}")
        ids = added_time_ids.reshape(b * t, 3).float()
        return torch.cat(
            [self.add_time_proj(ids[:, 0]), self.add_camera_proj(ids[:, 1]), self.add_camera_proj(ids[:, 2])], dim=-1
        )  # [B*T, adm]

    def forward(  # type: ignore[override]
        self,
        sample: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        added_time_ids: Tensor,
        return_dict: bool = True,
    ):
        """sample [B, T, C, H, W], timestep [B] (or scalar), context [B, L, D], added_time_ids [B, T, 3]."""
        batch_size, num_frames = sample.shape[:2]
        if added_time_ids.shape[:2] != (batch_size, num_frames):
            raise ValueError(
                f"added_time_ids {tuple(added_time_ids.shape)} does not match sample batch/frames {batch_size}x{num_frames}"
            )
        up_factor = 2**self.num_upsamplers
        forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])
        upsample_size = None

        timesteps = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
        timesteps = timesteps.reshape(-1).to(sample.device).expand(batch_size)  # [B]
        t_emb = self.time_proj(timesteps).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb)  # [B, E]
        emb = emb.repeat_interleave(num_frames, dim=0)  # [B*T, E]
        aug = self.embed_added_ids(added_time_ids).to(emb.dtype)  # [B*T, adm]
        emb = emb + self.add_embedding(aug)  # per-frame camera after the frame repeat

        sample = sample.flatten(0, 1)  # [B*T, C, H, W]
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)
        sample = self.conv_in(sample)
        image_only_indicator = torch.zeros(batch_size, num_frames, dtype=sample.dtype, device=sample.device)

        res_stack: tuple[Tensor, ...] = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                    image_only_indicator=image_only_indicator)
            else:
                sample, res = block(hidden_states=sample, temb=emb, image_only_indicator=image_only_indicator)
            res_stack += res
        sample = self.mid_block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                image_only_indicator=image_only_indicator)
        for i, block in enumerate(self.up_blocks):
            res = res_stack[-len(block.resnets):]
            res_stack = res_stack[: -len(block.resnets)]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = res_stack[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size,
                               image_only_indicator=image_only_indicator)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                               upsample_size=upsample_size, image_only_indicator=image_only_indicator)
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        sample = sample.reshape(batch_size, num_frames, *sample.shape[1:])  # [B, T, C, H, W]
        if not return_dict:
            return (sample,)
        from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput

        return UNetSpatioTemporalConditionOutput(sample=sample)


# ---------------------------------------------------------------------------------------
# Stability (sgm VideoUNet) <-> diffusers key layout
# ---------------------------------------------------------------------------------------

# inside a resnet (sgm ResBlock / VideoResBlock -> diffusers ResnetBlock2D / TemporalResnetBlock)
_RESNET_LEAF = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
]
# inside a spatial-video transformer
_ATTN_LEAF = [
    ("time_stack.", "temporal_transformer_blocks."),
    ("time_pos_embed.0.", "time_pos_embed.linear_1."),
    ("time_pos_embed.2.", "time_pos_embed.linear_2."),
]


def _block_prefix_pairs(unet: UNetSpatioTemporalConditionModel) -> list[tuple[str, str, str]]:
    """(sgm prefix, diffusers prefix, kind) for every resnet / attention / resampler of ``unet``.

    kind is one of "resnet", "attn", "down", "up".
    """
    pairs: list[tuple[str, str, str]] = []
    idx = 1  # input_blocks.0 is conv_in
    for b, block in enumerate(unet.down_blocks):
        for r in range(len(block.resnets)):
            pairs.append((f"input_blocks.{idx}.0.", f"down_blocks.{b}.resnets.{r}.", "resnet"))
            if getattr(block, "attentions", None) is not None and len(block.attentions) > r:
                pairs.append((f"input_blocks.{idx}.1.", f"down_blocks.{b}.attentions.{r}.", "attn"))
            idx += 1
        if block.downsamplers is not None:
            pairs.append((f"input_blocks.{idx}.0.op.", f"down_blocks.{b}.downsamplers.0.conv.", "down"))
            idx += 1
    pairs.append(("middle_block.0.", "mid_block.resnets.0.", "resnet"))
    pairs.append(("middle_block.1.", "mid_block.attentions.0.", "attn"))
    pairs.append(("middle_block.2.", "mid_block.resnets.1.", "resnet"))
    idx = 0
    for b, block in enumerate(unet.up_blocks):
        has_attn = getattr(block, "attentions", None) is not None
        for r in range(len(block.resnets)):
            pairs.append((f"output_blocks.{idx}.0.", f"up_blocks.{b}.resnets.{r}.", "resnet"))
            sub = 1
            if has_attn and len(block.attentions) > r:
                pairs.append((f"output_blocks.{idx}.1.", f"up_blocks.{b}.attentions.{r}.", "attn"))
                sub = 2
            if r == len(block.resnets) - 1 and block.upsamplers is not None:
                pairs.append((f"output_blocks.{idx}.{sub}.conv.", f"up_blocks.{b}.upsamplers.0.conv.", "up"))
            idx += 1
    return pairs


def _resnet_rest_sgm_to_diffusers(rest: str) -> str:
    if rest.startswith("time_mixer."):
        return rest  # time_mixer.mix_factor sits on the resnet in both layouts
    if rest.startswith("time_stack."):
        head, rest = "temporal_res_block.", rest[len("time_stack."):]
    else:
        head = "spatial_res_block."
    for old, new in _RESNET_LEAF:
        if rest.startswith(old):
            return head + new + rest[len(old):]
    raise KeyError(rest)


def _resnet_rest_diffusers_to_sgm(rest: str) -> str:
    if rest.startswith("time_mixer."):
        return rest
    if rest.startswith("temporal_res_block."):
        head, rest = "time_stack.", rest[len("temporal_res_block."):]
    elif rest.startswith("spatial_res_block."):
        head, rest = "", rest[len("spatial_res_block."):]
    else:
        raise KeyError(rest)
    for old, new in _RESNET_LEAF:
        if rest.startswith(new):
            return head + old + rest[len(new):]
    raise KeyError(rest)


def _attn_rest(rest: str, forward: bool) -> str:
    for old, new in _ATTN_LEAF:
        a, b = (old, new) if forward else (new, old)
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest


_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]


def sgm_key_to_diffusers(key: str, pairs: list[tuple[str, str, str]]) -> str:
    """Map one sgm UNet key (without ``model.diffusion_model.``) to the diffusers key."""
    for old, new in _TOP:
        if key.startswith(old):
            return new + key[len(old):]
    for sgm_p, dif_p, kind in pairs:
        if key.startswith(sgm_p):
            rest = key[len(sgm_p):]
            if kind == "resnet":
                return dif_p + _resnet_rest_sgm_to_diffusers(rest)
            if kind == "attn":
                return dif_p + _attn_rest(rest, True)
            return dif_p + rest
    raise KeyError(f"unknown Stability UNet key {key!r}")


def diffusers_key_to_sgm(key: str, pairs: list[tuple[str, str, str]]) -> str:
    """Inverse of :func:`sgm_key_to_diffusers`."""
    for old, new in _TOP:
        if key.startswith(new):
            return old + key[len(new):]
    for sgm_p, dif_p, kind in pairs:
        if key.startswith(dif_p):
            rest = key[len(dif_p):]
            if kind == "resnet":
                return sgm_p + _resnet_rest_diffusers_to_sgm(rest)
            if kind == "attn":
                return sgm_p + _attn_rest(rest, False)
            return sgm_p + rest
    raise KeyError(f"unknown diffusers UNet key {key!r}")


def convert_sgm_unet_state_dict(sd: dict[str, Tensor], unet: UNetSpatioTemporalConditionModel,
                                prefix: str = SGM_UNET_PREFIX) -> dict[str, Tensor]:
    """Stability checkpoint (full, with ``prefix``) -> state dict for ``unet`` (diffusers keys).

    Keys outside ``prefix`` (conditioner, first stage) are ignored; a key under ``prefix``
    that has no counterpart raises (load the result with ``strict=True`` to also catch
    missing ones).
    """
    pairs = _block_prefix_pairs(unet)
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        nk = sgm_key_to_diffusers(k[len(prefix):], pairs)
        if nk in out:
            raise KeyError(f"two Stability keys map to {nk!r}")
        out[nk] = v
    if not out:
        raise KeyError(f"no key starts with {prefix!r}: is this a Stability SV3D/SVD checkpoint?")
    return out


def to_sgm_unet_state_dict(unet: UNetSpatioTemporalConditionModel, prefix: str = SGM_UNET_PREFIX) -> dict[str, Tensor]:
    """The UNet's weights under Stability's key layout (exact inverse of the conversion)."""
    pairs = _block_prefix_pairs(unet)
    return {prefix + diffusers_key_to_sgm(k, pairs): v for k, v in unet.state_dict().items()}


SV3D_P_UNET_CONFIG: dict = dict(
    sample_size=72,
    in_channels=8,
    out_channels=4,
    down_block_types=(
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "DownBlockSpatioTemporal",
    ),
    up_block_types=(
        "UpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
    ),
    block_out_channels=(320, 640, 1280, 1280),
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=1280,
    layers_per_block=2,
    cross_attention_dim=1024,
    transformer_layers_per_block=1,
    num_attention_heads=(5, 10, 20, 20),
    num_frames=21,
)
"""SV3D_p's UNet (configs/sv3d_p.yaml of Stability: model_channels 320, mult 1-2-4-4, heads of 64, adm 1280)."""

SVD_XT_UNET_CONFIG: dict = {**SV3D_P_UNET_CONFIG, "projection_class_embeddings_input_dim": 768, "num_frames": 25}
"""SVD-XT's UNet (the diffusers config of stabilityai/stable-video-diffusion-img2vid-xt)."""


def sgm_key_pattern_ok(key: str) -> bool:
    """Cheap check that a key looks like sgm's VideoUNet layout (used in error messages)."""
    return re.match(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)\.", key) is not None


# ---------------------------------------------------------------------------------------
# SV3D_p's first stage: a per-frame image decoder (sgm ``Decoder``) in diffusers modules
# ---------------------------------------------------------------------------------------

SGM_DECODER_PREFIX = "first_stage_model.decoder."


class ImageDecoder(torch.nn.Module):
    """Per-frame VAE decoder: latents [N, C, h, w] (unscaled) -> images [N, 3, H, W] in [-1, 1].

    SV3D_p's checkpoint carries its own first stage, sgm's 2-D ``Decoder`` (no temporal
    layers, no post-quant convolution): every view is decoded on its own, unlike SVD-XT's
    temporal decoder, which mixes neighbouring frames. The module is diffusers' ``Decoder``
    (the same layers as sgm's); :func:`convert_sgm_decoder_state_dict` maps the keys.
    """

    def __init__(self, block_out_channels: tuple[int, ...] = (128, 256, 512, 512), layers_per_block: int = 2,
                 latent_channels: int = 4) -> None:
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder

        self.config = dict(block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                           latent_channels=latent_channels)
        self.decoder = Decoder(in_channels=latent_channels, out_channels=3,
                               up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
                               block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                               norm_num_groups=32, act_fn="silu", mid_block_add_attention=True)

    def forward(self, z: Tensor) -> Tensor:
        """z [N, C, h, w] -> [N, 3, H, W]."""
        return self.decoder(z)


SV3D_P_DECODER_CONFIG: dict = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
"""SV3D_p's first-stage decoder (configs/sv3d_p.yaml of Stability: ch 128, mult 1-2-4-4, 2 res blocks)."""

_DEC_RESNET_LEAF = [("nin_shortcut.", "conv_shortcut.")]
_DEC_ATTN_LEAF = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                  ("proj_out.", "to_out.0.")]


def _resnet_leaf(rest: str) -> str:
    """An sgm decoder ResNet leaf name (``norm1.weight``, ``nin_shortcut.bias``, ...) in diffusers' spelling."""
    for old, new in _DEC_RESNET_LEAF:
        rest = new + rest[len(old):] if rest.startswith(old) else rest
    return rest


def sgm_decoder_key_to_diffusers(key: str, num_levels: int) -> str:
    """One sgm ``Decoder`` key (without prefix) -> diffusers ``Decoder`` key (without ``decoder.``)."""
    if key.startswith("norm_out."):
        return "conv_norm_out." + key[len("norm_out."):]
    if key.startswith(("conv_in.", "conv_out.")):
        return key
    m = re.match(r"^mid\.block_([12])\.(.*)$", key)
    if m:
        return f"mid_block.resnets.{int(m.group(1)) - 1}.{_resnet_leaf(m.group(2))}"
    m = re.match(r"^mid\.attn_1\.(.*)$", key)
    if m:
        for old, new in _DEC_ATTN_LEAF:
            if m.group(1).startswith(old):
                return "mid_block.attentions.0." + new + m.group(1)[len(old):]
    m = re.match(r"^up\.(\d+)\.block\.(\d+)\.(.*)$", key)
    if m:
        return f"up_blocks.{num_levels - 1 - int(m.group(1))}.resnets.{m.group(2)}.{_resnet_leaf(m.group(3))}"
    m = re.match(r"^up\.(\d+)\.upsample\.conv\.(.*)$", key)
    if m:
        return f"up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    raise KeyError(f"unknown sgm decoder key {key!r}")


def convert_sgm_decoder_state_dict(sd: dict[str, Tensor], decoder: ImageDecoder,
                                   prefix: str = SGM_DECODER_PREFIX) -> dict[str, Tensor]:
    """Stability checkpoint (keys under ``prefix``) -> state dict of ``decoder`` (load with ``strict=True``).

    The attention's 1x1 convolutions become linear weights ([C, C, 1, 1] -> [C, C]).
    """
    n = len(decoder.config["block_out_channels"])
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        nk = "decoder." + sgm_decoder_key_to_diffusers(k[len(prefix):], n)
        if ".attentions.0.to_" in nk and nk.endswith(".weight") and v.ndim == 4:
            v = v[:, :, 0, 0]
        out[nk] = v
    if not out:
        raise KeyError(f"no key starts with {prefix!r}: this checkpoint carries no first-stage decoder")
    return out


def to_sgm_decoder_state_dict(decoder: ImageDecoder, prefix: str = SGM_DECODER_PREFIX) -> dict[str, Tensor]:
    """The decoder's weights under sgm's key layout (exact inverse of :func:`convert_sgm_decoder_state_dict`)."""
    n = len(decoder.config["block_out_channels"])
    sd = decoder.state_dict()
    names: dict[str, str] = {}
    levels = n
    sgm_keys = ["conv_in.", "conv_out.", "norm_out.", "mid.block_1.", "mid.block_2.", "mid.attn_1."]
    sgm_keys += [f"up.{i}.block.{j}." for i in range(levels) for j in range(decoder.config["layers_per_block"] + 1)]
    sgm_keys += [f"up.{i}.upsample.conv." for i in range(1, levels)]
    leaves = {k.split(".")[-1] for k in sd}
    for head in sgm_keys:  # enumerate candidate sgm keys and keep those that map onto our keys
        for mid in ["", "norm1.", "conv1.", "norm2.", "conv2.", "nin_shortcut.", "norm.", "q.", "k.", "v.",
                    "proj_out."]:
            for leaf in leaves:
                cand = head + mid + leaf
                try:
                    nk = "decoder." + sgm_decoder_key_to_diffusers(cand, n)
                except KeyError:
                    continue
                if nk in sd:
                    names[nk] = cand
    out: dict[str, Tensor] = {}
    for nk, v in sd.items():
        if nk not in names:
            raise KeyError(f"no sgm key maps to {nk!r}")
        if ".attentions.0.to_" in nk and nk.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[prefix + names[nk]] = v
    return out


def load_sgm_image_decoder(sd: dict[str, Tensor], config: dict | None = None,
                           prefix: str = SGM_DECODER_PREFIX) -> ImageDecoder:
    """SV3D_p's first-stage decoder from a Stability state dict (``strict=True``)."""
    decoder = ImageDecoder(**(config or SV3D_P_DECODER_CONFIG))
    decoder.load_state_dict(convert_sgm_decoder_state_dict(sd, decoder, prefix), strict=True)
    return decoder
