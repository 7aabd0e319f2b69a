"""How the priors' UNets execute: attention kernel, batch splitting, memory format, compilation.

None of these changes what a UNet computes (beyond float rounding); they change how fast it
runs and which batch sizes it accepts. :class:`d2.stages.priors.Prior` applies them.

- ``attention_backend``: which ``F.scaled_dot_product_attention`` kernel is preferred
  (``auto`` = torch's own choice; ``cudnn`` / ``flash`` / ``efficient`` are tried first and
  fall back to torch's other kernels where they do not apply; ``math`` = reference kernel).
- ``attention_max_batch``: the temporal attention of a spatio-temporal UNet runs one sequence
  per latent pixel and batch element (``2 * chunk * 72 * 72`` at 576 px with CFG). CUDA's
  fused kernels put that batch on a grid axis limited to 65535, so larger batches are split
  into pieces of at most this many sequences (:class:`BatchSplitAttnProcessor`).
- ``cross_attention_shortcut``: SVD's and SV3D's cross-attention attends to one token (the CLIP
  image embedding). The softmax over a single key is exactly 1, so the output is
  ``to_out(to_v(context))`` for every query: the query / key projections, the attention kernel
  and all but one row of the output projection are skipped (:func:`single_key_attention`;
  4.5 % of the full-size SVD-XT UNet's FLOPs outside attention, bench/unet_variants.py counts
  them). Exact up to GEMM rounding.
- ``channels_last``: NHWC weights for the 2-D convolutions.
- ``temporal_conv``: ``conv3d`` (as built) or ``gemm``: the temporal ``Conv3d`` with kernel
  (3, 1, 1) computed as one matrix product over the three frame-shifted copies of its input
  (:class:`TemporalConvAsGemm`; same weights and keys), which avoids cuDNN's layout
  transposes of 5-D tensors.
- ``temporal_norm``: ``groupnorm`` (as built) or ``framewise``: the temporal blocks' GroupNorm
  with its statistics reduced per frame and combined exactly (:class:`FramewiseGroupNorm`),
  a reduction shape that parallelises over ``B x F x G`` rows instead of ``B x G``.
- ``cudnn_benchmark``: let cuDNN time its convolution algorithms per shape on first use
  (``torch.backends.cudnn.benchmark``; process-wide, not bitwise reproducible across runs).
- ``compile``: ``torch.compile`` the UNet in place (state-dict keys unchanged). The first call
  of every new input shape compiles (minutes at full size); the sampler keeps its chunk shapes
  equal so that one compilation per UNet serves a whole matrix. ``compile_mode`` is passed to
  ``torch.compile`` (``max-autotune-no-cudagraphs`` also tunes Triton GEMM / convolution
  templates: longer compilation) and ``compile_freezing`` sets Inductor's ``freezing``
  (weights folded in as constants; inference only).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

TemporalConv = Literal["conv3d", "gemm"]
TEMPORAL_CONVS: tuple[str, ...] = ("conv3d", "gemm")
TemporalNorm = Literal["groupnorm", "framewise"]
TEMPORAL_NORMS: tuple[str, ...] = ("groupnorm", "framewise")
CompileMode = Literal["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"]
COMPILE_MODES: tuple[str, ...] = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
AttentionBackend = Literal["auto", "cudnn", "flash", "efficient", "math"]
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "cudnn", "flash", "efficient", "math")
CUDA_GRID_LIMIT = 65535  # largest grid extent along y / z: the fused attention kernels' batch axis


def attention_context(backend: AttentionBackend) -> contextlib.AbstractContextManager:
    """Context preferring ``backend`` for every ``scaled_dot_product_attention`` inside it."""
    if backend == "auto":
        return contextlib.nullcontext()
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
    if backend == "math":
        return sdpa_kernel([first])
    rest = [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH) if b != first]
    return sdpa_kernel([first, *rest], set_priority=True)


def single_key_attention(attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor) -> Tensor | None:
    """Cross-attention to a single key token, in closed form; ``None`` where that does not apply.

    With one key the attention weights are ``softmax([s]) = [1]`` whatever the query, so
    ``Attention(q, k, v) = v`` and the module's output is ``to_out(to_v(norm_cross(context)))``,
    the same row for every query (``rescale_output_factor`` applied). Returned as a broadcast
    view ``[B, L_q, C]`` of ``[B, 1, C]``. Applies to diffusers' ``Attention`` in eval mode with a
    3-D input, no mask, no residual connection, no spatial / group norm, no added key / value
    projections; a non-finite score (where SDPA would give NaN) is not reproduced.
    """
    if (encoder_hidden_states is None or encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[1] != 1
            or hidden_states.ndim != 3 or attn.training or getattr(attn, "residual_connection", True)
            or getattr(attn, "spatial_norm", None) is not None or getattr(attn, "group_norm", None) is not None
            or getattr(attn, "added_kv_proj_dim", None) is not None or not hasattr(attn, "to_v")
            or encoder_hidden_states.shape[0] != hidden_states.shape[0]):
        return None
    ctx = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
    out = attn.to_out[1](attn.to_out[0](attn.to_v(ctx).to(hidden_states.dtype)))
    out = out / attn.rescale_output_factor
    return out.expand(hidden_states.shape[0], hidden_states.shape[1], out.shape[-1])


class BatchSplitAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` run on pieces of at most ``max_batch`` sequences.

    Exact: attention is independent across the batch; the pieces are concatenated back.
    Note (``single_key_shortcut``): cross-attention to one context token takes
    :func:`single_key_attention` instead, which calls no attention kernel at all.
    """

    def __init__(self, max_batch: int = CUDA_GRID_LIMIT // 2, single_key_shortcut: bool = True) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        if max_batch < 1:
            raise ValueError(f"attention_max_batch must be >= 1, got {max_batch}")
        self.inner = AttnProcessor2_0()
        self.max_batch = int(max_batch)
        self.single_key_shortcut = bool(single_key_shortcut)

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        if self.single_key_shortcut and attention_mask is None and encoder_hidden_states is not None:
            out = single_key_attention(attn, hidden_states, encoder_hidden_states)
            if out is not None:
                return out
        b = hidden_states.shape[0]
        if b <= self.max_batch:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        def piece(t: Tensor | None, sl: slice) -> Tensor | None:
            return t[sl] if t is not None and t.shape[0] == b else t

        outs = []
        for start in range(0, b, self.max_batch):
            sl = slice(start, start + self.max_batch)
            outs.append(self.inner(attn, hidden_states[sl], piece(encoder_hidden_states, sl),
                                   piece(attention_mask, sl), piece(temb, sl)))
        return torch.cat(outs)


class TemporalConvAsGemm(nn.Conv3d):
    """A temporal ``Conv3d`` (kernel (K, 1, 1), stride 1, padding ((K-1)/2, 0, 0)) as one GEMM.

    ``y[b, :, f] = sum_k W[:, :, k] x[b, :, f + k - (K-1)/2]`` (zero outside the clip) is computed as
    ``cat_k(x_shifted_k) @ W.reshape`` on channels-last rows ``[B*F*H*W, K*C_in]``: a single matrix
    product with ``K * C_in`` reduction depth instead of a 5-D convolution. Same parameters and
    state-dict keys as the ``Conv3d`` it replaces (:func:`temporal_conv_as_gemm` swaps the class).
    """

    @staticmethod
    def applies(mod: nn.Module) -> bool:
        if type(mod) is not nn.Conv3d:
            return False
        k = mod.kernel_size
        return (k[1] == k[2] == 1 and k[0] % 2 == 1 and mod.stride == (1, 1, 1) and mod.dilation == (1, 1, 1)
                and mod.groups == 1 and mod.padding == ((k[0] - 1) // 2, 0, 0) and mod.padding_mode == "zeros")

    def forward(self, x: Tensor) -> Tensor:  # x [B, C_in, F, H, W] -> [B, C_out, F, H, W]
        k = self.kernel_size[0]
        p = (k - 1) // 2
        f = x.shape[2]
        xt = x.permute(0, 2, 3, 4, 1)  # [B, F, H, W, C_in]
        xp = torch.nn.functional.pad(xt, (0, 0, 0, 0, 0, 0, p, p))  # zero frames at both ends
        cols = torch.cat([xp[:, i:i + f] for i in range(k)], dim=-1)  # [B, F, H, W, K*C_in], k-major
        w = self.weight[:, :, :, 0, 0].permute(0, 2, 1).reshape(self.out_channels, k * self.in_channels)
        y = torch.nn.functional.linear(cols, w, self.bias)  # [B, F, H, W, C_out]
        return y.permute(0, 4, 1, 2, 3)


class FramewiseGroupNorm(nn.GroupNorm):
    """``GroupNorm`` of a 5-D ``[B, C, F, H, W]`` tensor with its statistics gathered frame by frame.

    The temporal ResNet blocks normalise each (sample, group) over ``C/G x F x H x W`` values of a
    frame-major tensor seen through a permute: one long strided reduction per (sample, group).
    Here each (sample, frame, group) is reduced on its own (``C/G x H x W`` values, in float32) and
    the per-frame moments are combined exactly (equal counts): ``mean = mean_f(m_f)``,
    ``var = mean_f(v_f) + mean_f((m_f - mean)^2)``. Same parameters; 4-D inputs take ``GroupNorm``.
    """

    def forward(self, x: Tensor) -> Tensor:  # x [B, C, F, H, W]
        if x.ndim != 5:
            return super().forward(x)
        b, c, f = x.shape[:3]
        g = self.num_groups
        frames = x.transpose(1, 2).reshape(b, f, g, -1).float()  # [B, F, G, C/G*H*W]
        var_f, mean_f = torch.var_mean(frames, dim=-1, correction=0)  # [B, F, G]
        mean = mean_f.mean(1)  # [B, G]
        var = var_f.mean(1) + (mean_f - mean[:, None]).square().mean(1)
        scale = torch.rsqrt(var + self.eps).repeat_interleave(c // g, dim=1)  # [B, C]
        shift = -mean.repeat_interleave(c // g, dim=1) * scale
        if self.affine:
            scale, shift = scale * self.weight.float(), shift * self.weight.float() + self.bias.float()
        y = x.float() * scale[:, :, None, None, None] + shift[:, :, None, None, None]
        return y.to(x.dtype)


def _swap_class(unet: nn.Module, base: type[nn.Module], swapped: type[nn.Module], enable: bool) -> int:
    """Set ``swapped`` as the class of every exact-``base`` module where it applies (or back); returns the count.

    A class swap keeps the module's parameters, buffers and state-dict keys untouched.
    """
    applies = getattr(swapped, "applies", lambda mod: True)
    n = 0
    for mod in unet.modules():
        if enable and type(mod) is base and applies(mod):
            mod.__class__ = swapped
            n += 1
        elif not enable and type(mod) is swapped:
            mod.__class__ = base
            n += 1
    return n


def framewise_group_norm(unet: nn.Module, enable: bool = True) -> int:
    """Swap every ``GroupNorm`` of ``unet`` to (or back from) :class:`FramewiseGroupNorm`; returns the count."""
    return _swap_class(unet, nn.GroupNorm, FramewiseGroupNorm, enable)


def temporal_conv_as_gemm(unet: nn.Module, enable: bool = True) -> int:
    """Swap every temporal ``Conv3d`` of ``unet`` to (or back from) :class:`TemporalConvAsGemm`; returns the count."""
    return _swap_class(unet, nn.Conv3d, TemporalConvAsGemm, enable)


def prepare_unet(unet: nn.Module, *, attention_max_batch: int = CUDA_GRID_LIMIT // 2,
                 cross_attention_shortcut: bool = True, channels_last: bool = False,
                 temporal_conv: TemporalConv = "conv3d", temporal_norm: TemporalNorm = "groupnorm",
                 compile: bool = False, compile_mode: CompileMode = "default", compile_freezing: bool = False
                 ) -> nn.Module:
    """Install the attention processor, set layouts and the temporal convolution, compile; returns ``unet`` (in place)."""
    if temporal_conv not in TEMPORAL_CONVS:
        raise ValueError(f"temporal_conv must be one of {TEMPORAL_CONVS}, got {temporal_conv!r}")
    if temporal_norm not in TEMPORAL_NORMS:
        raise ValueError(f"temporal_norm must be one of {TEMPORAL_NORMS}, got {temporal_norm!r}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    if hasattr(unet, "set_attn_processor") and getattr(unet, "attn_processors", None):
        unet.set_attn_processor(BatchSplitAttnProcessor(attention_max_batch, cross_attention_shortcut))
    if channels_last:  # 2-D convolution weights only (the temporal Conv3d weights keep their layout)
        for mod in unet.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.data = mod.weight.data.contiguous(memory_format=torch.channels_last)
    temporal_conv_as_gemm(unet, temporal_conv == "gemm")
    framewise_group_norm(unet, temporal_norm == "framewise")
    if compile:
        from torch._inductor import list_mode_options

        options = {**list_mode_options(compile_mode),  # this UNet's Inductor options (no global config)
                   "conv_1x1_as_mm": True,  # 1x1 convolutions (the transformer's proj_in/out) as GEMMs
                   "freezing": bool(compile_freezing)}
        unet.compile(dynamic=False, options=options)
    return unet


@contextlib.contextmanager
def no_compile(unet: nn.Module) -> Iterator[nn.Module]:
    """Run ``unet`` eagerly inside the block even if it was compiled (FLOP counting, debugging)."""
    saved = getattr(unet, "_compiled_call_impl", None)
    unet._compiled_call_impl = None
    try:
        yield unet
    finally:
        unet._compiled_call_impl = saved
