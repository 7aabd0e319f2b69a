"""The ``tiny`` backend: both families from tiny diffusers / transformers configs with seeded
random weights (tests, CPU runs), and the small spatio-temporal UNet configs the miniature
priors are trained with."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from d2.stages.priors.base import DTYPES, Family, PixelSpaceVAE, Prior
from d2.stages.priors.config import PriorsConfig, TinyPriorConfig


def spatiotemporal_unet_config(
    *,
    family: Family,
    latent_channels: int,
    block_out_channels: Sequence[int],
    attention: Sequence[bool],
    addition_time_embed_dim: int,
    layers_per_block: int,
    cross_attention_dim: int,
    num_attention_heads: int,
    num_frames: int,
    sample_size: int | None = None,
) -> dict:
    """diffusers UNetSpatioTemporalConditionModel config of a small prior of ``family``.

    ``attention[i]`` puts cross-attention blocks at level ``i`` (mirrored on the way up). The
    added-ids width follows the family: video (fps_id, motion_bucket_id, cond_aug) x d;
    multi-view (SV3D_p) cond_aug d + polar 2d + azimuth 2d.
    """
    d = addition_time_embed_dim
    return dict(
        sample_size=sample_size,
        in_channels=2 * latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple("CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal"
                               for a in attention),
        up_block_types=tuple("CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal"
                             for a in attention[::-1]),
        block_out_channels=tuple(block_out_channels),
        addition_time_embed_dim=d,
        projection_class_embeddings_input_dim=3 * d if family == "video" else 5 * d,
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        num_attention_heads=num_attention_heads,
        num_frames=num_frames,
    )


def tiny_unet_config(t: TinyPriorConfig, family: Family, latent_channels: int, num_frames: int) -> dict:
    """diffusers UNet config of the tiny backend (cross-attention on every level but the last)."""
    n = len(t.block_out_channels)
    return spatiotemporal_unet_config(
        family=family, latent_channels=latent_channels, block_out_channels=t.block_out_channels,
        attention=[i < n - 1 for i in range(n)], addition_time_embed_dim=t.addition_time_embed_dim,
        layers_per_block=t.layers_per_block, cross_attention_dim=t.cross_attention_dim,
        num_attention_heads=t.num_attention_heads, num_frames=num_frames,
    )


def build_tiny_prior(t: TinyPriorConfig, family: Family, seed: int | None = None) -> Prior:
    """A prior of ``family`` from tiny configs with seeded random weights (CPU, fp32)."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from d2.stages.sv3d import ImageDecoder, SV3DUNet

    seed = t.seed + (0 if family == "video" else 1) if seed is None else seed
    cpu_rng = torch.random.fork_rng(devices=[])
    with cpu_rng:
        torch.manual_seed(seed)
        if t.vae:
            nb = len(t.vae_block_out_channels)
            vae: nn.Module = AutoencoderKLTemporalDecoder(
                in_channels=3, out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * nb,
                block_out_channels=tuple(t.vae_block_out_channels),
                layers_per_block=1, latent_channels=4, sample_size=t.resolution,
            )
            latent_channels = 4
        else:
            vae = PixelSpaceVAE()
            latent_channels = 3
        ucfg = tiny_unet_config(t, family, latent_channels, 8)
        unet = (UNetSpatioTemporalConditionModel if family == "video" else SV3DUNet)(**ucfg)
        clip_cfg = CLIPVisionConfig(
            hidden_size=t.clip_hidden_size, projection_dim=t.cross_attention_dim, num_hidden_layers=t.clip_layers,
            num_attention_heads=2, intermediate_size=2 * t.clip_hidden_size, image_size=t.clip_image_size,
            patch_size=8,
        )
        encoder = CLIPVisionModelWithProjection(clip_cfg)
        image_decoder = None
        if t.vae and family == "multiview":  # SV3D_p's own per-frame first stage, after the rest (same weights above)
            image_decoder = ImageDecoder(tuple(t.vae_block_out_channels), layers_per_block=1, latent_channels=4)
    fe = CLIPImageProcessor(crop_size=t.clip_image_size, size={"shortest_edge": t.clip_image_size})
    return Prior(family, unet, vae, encoder, fe, t.resolution, name=f"tiny-{family}", image_decoder=image_decoder)


def build_tiny(cfg: PriorsConfig, family: Family, device: torch.device) -> Prior:
    """Backend ``tiny``."""
    prior = build_tiny_prior(cfg.tiny, family)
    return prior.to(device=device, dtype=DTYPES[cfg.dtype])
