"""The layers of Stability's SV4D / SV4D 2.0 UNet (sgm's ``SpatialUNetModelWithTime``), re-written.

Every module keeps sgm's parameter names (``in_layers.0``, ``to_out.0``, ``time_mix_blocks``,
``motion_blocks``, ...), so the checkpoint's ``model.diffusion_model.*`` tensors load with only
that prefix removed (:mod:`d2.stages.sv4d`). Each computation is sgm's, operation for operation
(same reshapes, same order of sums), so that float64 outputs agree to rounding
(tests/test_sv4d_parity.py); comments say which sgm class a module stands for.

A latent batch holds ``N = B * T * V`` images, ordered (sequence, time, view): B sequences
(conditional / unconditional copies), T frames of the motion, V camera views.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[N] -> [N, dim] float32: cosines, then sines, of ``t`` times geometric frequencies.

    sgm's ``timestep_embedding``: the frequencies are computed on the CPU in float32, the
    embedding in float32 whatever the model's dtype (the caller casts it).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """sgm's ``normalization``: 32 groups, eps 1e-5, computed in at least float32 (half inputs upcast)."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        return F.group_norm(x.to(work), self.num_groups, self.weight.to(work), self.bias.to(work),
                            self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head (cross-)attention, sgm's ``CrossAttention`` / ``MemoryEfficientCrossAttention``.

    A context of a single token is computed in closed form: the softmax over one key is
    exactly 1, so every query receives ``to_out(to_v(context))``. ``context_repeats`` = r says
    each context row serves r consecutive query rows (sgm repeats the rows; projecting each
    row once gives the same values for r times less work). Batches larger than
    ``max_batch`` sequences run in pieces (CUDA's fused kernels hold at most 65535 blocks on
    their batch axis; sgm splits at 32768 as well).
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 max_batch: int = 32768) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.max_batch = heads, dim_head, max_batch
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None, context_repeats: int = 1) -> Tensor:
        """x [B, Lq, query_dim], context [B / r, Lk, context_dim] (None: self-attention) -> [B, Lq, query_dim]."""
        if context is not None and context.shape[1] == 1:
            out = self.to_out(self.to_v(context))  # [B / r, 1, D]
            return out.repeat_interleave(context_repeats, dim=0).expand(-1, x.shape[1], -1)  # seen as [B, Lq, D]
        if context is not None and context_repeats > 1:
            context = context.repeat_interleave(context_repeats, dim=0)
        ctx = x if context is None else context
        b = x.shape[0]
        q, k, v = (p(s).view(b, s.shape[1], self.heads, self.dim_head).transpose(1, 2)
                   for p, s in ((self.to_q, x), (self.to_k, ctx), (self.to_v, ctx)))  # [B, heads, L, d]
        pieces = [slice(i, i + self.max_batch) for i in range(0, b, self.max_batch)]
        outs = [F.scaled_dot_product_attention(q[p], k[p], v[p]) for p in pieces]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # [B, heads, Lq, d]
        return self.to_out(out.transpose(1, 2).reshape(b, x.shape[1], self.heads * self.dim_head))


class GEGLU(nn.Module):
    """Linear to twice the width, then value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """sgm's gated ``FeedForward``: GEGLU to 4x the width, then back to ``dim_out``."""

    def __init__(self, dim: int, dim_out: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim_out or dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """sgm's ``BasicTransformerBlock``: self-attention, cross-attention, feed-forward (pre-norm, residual)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, max_batch: int) -> None:
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head, max_batch=max_batch)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim, max_batch=max_batch)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, context_repeats: int = 1) -> Tensor:
        """x [B, L, dim], context [B / context_repeats, Lc, context_dim] -> [B, L, dim]."""
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, context_repeats) + x
        return self.ff(self.norm3(x)) + x


class AxisTransformerBlock(nn.Module):
    """sgm's ``BasicTransformerTimeMixBlock`` (with ``ff_in``): attention along a batch axis.

    The input ``[B, S, C]`` is read as ``(B / n, n)`` rows of ``S`` tokens and regrouped to
    ``B / n * S`` sequences of ``n`` tokens (sgm's ``"(b t) s c -> (b s) t c"``, t = n); the
    block attends along those n tokens, then the regrouping is undone. Which axis that is
    depends on how the caller laid out the rows (see :class:`MotionTransformer`).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, ff_in: bool, max_batch: int) -> None:
        super().__init__()
        self.has_ff_in = ff_in
        if ff_in:
            self.norm_in = nn.LayerNorm(dim)
            self.ff_in = FeedForward(dim, dim)
        self.attn1 = Attention(dim, heads, dim_head, max_batch=max_batch)
        self.ff = FeedForward(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim, max_batch=max_batch)
        self.norm1, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, n: int, context_repeats: int = 1) -> Tensor:
        """x [B, S, C], context [B / n * S / r, Lc, context_dim] -> [B, S, C], attending over groups of n rows.

        Context row i serves the regrouped rows i r .. i r + r - 1 (r = ``context_repeats``).
        """
        rows, s, c = x.shape
        x = x.view(rows // n, n, s, c).transpose(1, 2).reshape(rows // n * s, n, c)  # [(B/n) S, n, C]
        if self.has_ff_in:
            x = self.ff_in(self.norm_in(x)) + x
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, context_repeats) + x
        x = self.ff(self.norm3(x)) + x
        return x.view(rows // n, s, n, c).transpose(1, 2).reshape(rows, s, c)


class Blend(nn.Module):
    """sgm's ``AlphaBlender`` (``learned_with_images``): ``a * first + (1 - a) * second``, a = sigmoid(mix_factor).

    sgm passes an ``image_only_indicator`` of zeros to every blend of this network, so the
    factor is the learned one everywhere.
    """

    def __init__(self, merge_factor: float) -> None:
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([float(merge_factor)]))

    def forward(self, first: Tensor, second: Tensor) -> Tensor:
        a = torch.sigmoid(self.mix_factor)
        return a.to(first.dtype) * first + (1.0 - a).to(first.dtype) * second


class ResBlock(nn.Module):
    """sgm's ``ResBlock`` (no up/down sampling, no scale-shift norm), 2-D or 3-D.

    The 3-D form (``temporal=True``) convolves ``[B, C, T, H, W]`` with a ``(3, 1, 1)`` kernel
    and takes one embedding per frame, ``[B, T, E]`` (sgm's ``exchange_temb_dims``).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int,
                 kernel_size: int | tuple[int, ...] = 3, temporal: bool = False) -> None:
        super().__init__()
        conv = nn.Conv3d if temporal else nn.Conv2d
        padding = tuple(k // 2 for k in kernel_size) if isinstance(kernel_size, tuple) else kernel_size // 2
        self.temporal = temporal
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       conv(channels, out_channels, kernel_size, padding=padding))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        conv(out_channels, out_channels, kernel_size, padding=padding))
        self.skip_connection = nn.Identity() if out_channels == channels else conv(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """2-D: x [N, C, H, W], emb [N, E]; 3-D: x [B, C, T, H, W], emb [B, T, E]."""
        h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)
        # one embedding per frame [B, C, T, 1, 1] (3-D), per image [N, C, 1, 1] (2-D)
        e = e.permute(0, 2, 1)[..., None, None] if self.temporal else e[..., None, None]
        return self.skip_connection(x) + self.out_layers(h + e)


class TemporalResBlock(ResBlock):
    """sgm's ``PostHocResBlockWithTime``: a 2-D resnet, then a 3-D resnet across all N / B frames, blended.

    The "frames" of the 3-D convolution are all T * V images of a sequence in (time, view)
    order, as sgm passes ``num_video_frames = T * V``.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, time_kernel_size: tuple[int, ...],
                 merge_factor: float) -> None:
        super().__init__(channels, emb_channels, out_channels)
        self.time_mix_blocks = ResBlock(out_channels, emb_channels, out_channels, time_kernel_size, temporal=True)
        self.time_mixer = Blend(merge_factor)

    def forward(self, x: Tensor, emb: Tensor, num_frames: int) -> Tensor:  # type: ignore[override]
        """x [N, C, H, W], emb [N, E], N = sequences * num_frames -> [N, C', H, W]."""
        x = super().forward(x, emb)
        n, c, hh, ww = x.shape
        spatial = x.view(n // num_frames, num_frames, c, hh, ww).permute(0, 2, 1, 3, 4)  # [B, C, F, H, W]
        temporal = self.time_mix_blocks(spatial, emb.view(n // num_frames, num_frames, -1))
        x = self.time_mixer(spatial, temporal)
        return x.permute(0, 2, 1, 3, 4).reshape(n, c, hh, ww)


class Downsample(nn.Module):
    """Strided 3x3 convolution (sgm's ``Downsample`` with ``use_conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 convolution (sgm's ``Upsample`` with ``use_conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


class MotionTransformer(nn.Module):
    """sgm's ``PostHocSpatialTransformerWithTimeMixingAndMotion``: spatial, camera and motion attention.

    Per transformer block, on the tokens of ``N = B * T * V`` images of ``H * W`` pixels:

    1. spatial: self-attention over the pixels of each image, cross-attention to the CLIP
       embedding of its frame (``context [B, T, D]``);
    2. camera (``time_mix_blocks``): rows laid out (sequence, view, frame * pixel), plus a
       per-view embedding, regrouped by V (:class:`AxisTransformerBlock`): attention across
       the V views of each frame and pixel. With ``use_3d_attention`` the rows are laid out
       (sequence, view, pixel) x frames before the same regrouping by V, which then groups V
       consecutive rows of that layout: V neighbouring pixels (raster order) of one view, so
       this layer never mixes views (sgm's code does exactly this; views then meet only in the
       temporal resnets). Cross-attention to the CLIP embeddings laid out (sequence, frame,
       pixel), row for row. Blended with the input by ``time_mixer``;
    3. motion (``motion_blocks``): rows (sequence, frame, view * pixel) plus a per-frame
       embedding, regrouped by T: attention across the T frames of each view and pixel,
       cross-attention to the reference views' latents (``cond_view [B * V, 4, h, w]``,
       resized bilinearly to this level). Blended by ``time_mixer_motion`` (SV4D 2.0) or
       ``time_mixer``.

    The per-view embedding is an MLP of the view index's sinusoid (SV4D) or, with
    ``use_camera_emb`` (SV4D 2.0), of the UNet's own embedding (timestep + vector y) of the
    first frame's images: sgm passes that embedding where this layer expects its camera input.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 motion_context_dim: int, emb_channels: int, ff_in: bool, merge_factor: float,
                 use_camera_emb: bool, use_3d_attention: bool, separate_motion_merge_factor: bool,
                 max_time_embed_period: int, max_batch: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_camera_emb, self.use_3d_attention = use_camera_emb, use_3d_attention
        self.max_time_embed_period = max_time_embed_period
        self.in_channels = channels
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, dim_head, context_dim, max_batch) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, channels)
        self.time_mix_blocks = nn.ModuleList(
            [AxisTransformerBlock(inner, heads, dim_head, context_dim, ff_in, max_batch) for _ in range(depth)])
        self.motion_blocks = nn.ModuleList(
            [AxisTransformerBlock(inner, heads, dim_head, motion_context_dim, ff_in, max_batch) for _ in range(depth)])
        self.time_mix_time_embed = _mlp(emb_channels if use_camera_emb else channels, 4 * channels, channels)
        self.time_mix_motion_embed = _mlp(channels, 4 * channels, channels)
        self.time_mixer = Blend(merge_factor)
        self.time_mixer_motion = Blend(merge_factor) if separate_motion_merge_factor else None

    def _index_embedding(self, mlp: nn.Sequential, count: int, repeats: int, device: torch.device,
                         dtype: torch.dtype) -> Tensor:
        """MLP of the sinusoids of 0..count-1, tiled ``repeats`` times: [repeats * count, 1, C]."""
        idx = torch.arange(count, device=device).repeat(repeats)
        return mlp(sinusoidal_embedding(idx, self.in_channels, self.max_time_embed_period).to(dtype))[:, None]

    def forward(self, x: Tensor, context: Tensor, emb: Tensor, cond_view: Tensor) -> Tensor:
        """x [N, C, H, W], context [B, T, D], emb [N, E], cond_view [B * V, Dm, h, w] -> [N, C, H, W]."""
        b, t, d = context.shape
        v = cond_view.shape[0] // b
        _, c, hh, ww = x.shape
        hw = hh * ww
        x_in = x
        view_lat = F.interpolate(cond_view, size=(hh, ww), mode="bilinear")  # [B V, Dm, H, W]
        frame_ctx = context.reshape(b * t, 1, d)  # [B T, 1, D]: sgm repeats it V times (spatial), HW times (camera)
        motion_ctx = view_lat.permute(0, 2, 3, 1).reshape(-1, 1, cond_view.shape[1])  # [B V HW, 1, Dm]

        x = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(-1, hw, c))  # [N, HW, C]
        emb_time = self._index_embedding(self.time_mix_motion_embed, t, b, x.device, x.dtype)  # [B T, 1, C]
        if self.use_camera_emb:
            first_frame = emb.view(b, t, v, -1)[:, 0].reshape(b * v, -1)  # [B V, E]
            emb_view = self.time_mix_time_embed(first_frame)[:, None]  # [B V, 1, C]
        else:
            emb_view = self._index_embedding(self.time_mix_time_embed, v, b, x.device, x.dtype)  # [B V, 1, C]
        if self.use_3d_attention:
            emb_view = emb_view.repeat(1, hw, 1).view(-1, 1, c)  # [B V HW, 1, C]

        motion_mixer = self.time_mixer if self.time_mixer_motion is None else self.time_mixer_motion
        for block, camera_block, motion_block in zip(self.transformer_blocks, self.time_mix_blocks,
                                                     self.motion_blocks):
            x = block(x, frame_ctx, v)  # [B T V, HW, C]
            if self.use_3d_attention:
                x = x.view(b, t, v, hw, c).permute(0, 2, 3, 1, 4).reshape(-1, t, c)  # [B V HW, T, C]
            else:
                x = x.view(b, t, v, hw, c).permute(0, 2, 1, 3, 4).reshape(b * v, -1, c)  # [B V, T HW, C]
            x = self.time_mixer(x, camera_block(x + emb_view, frame_ctx, v, hw))
            if self.use_3d_attention:
                x = x.view(b, v, hw, t, c).permute(0, 3, 1, 2, 4).reshape(b * t, -1, c)  # [B T, V HW, C]
            else:
                x = x.view(b, v, t, hw, c).permute(0, 2, 1, 3, 4).reshape(b * t, -1, c)  # [B T, V HW, C]
            x = motion_mixer(x, motion_block(x + emb_time, motion_ctx, t))
            x = x.reshape(-1, hw, c)  # [B T V, HW, C]
        x = self.proj_out(x).view(-1, hh, ww, c).permute(0, 3, 1, 2)  # [N, C, H, W]
        return x + x_in
