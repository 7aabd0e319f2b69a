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
- ``channels_last``: NHWC weights for the 2-D convolutions.
- ``compile``: ``torch.compile`` the UNet in place (state-dict keys unchanged). The first call
  of every new input shape compiles (minutes at full size); the sampler keeps its chunk shapes
  equal so that one compilation per UNet serves a whole matrix.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

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


class BatchSplitAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` run on pieces of at most ``max_batch`` sequences.

    Exact: attention is independent across the batch; the pieces are concatenated back.
    """

    def __init__(self, max_batch: int = CUDA_GRID_LIMIT // 2) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        if max_batch < 1:
            raise ValueError(f"attention_max_batch must be >= 1, got {max_batch}")
        self.inner = AttnProcessor2_0()
        self.max_batch = int(max_batch)

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
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


def prepare_unet(unet: nn.Module, *, attention_max_batch: int = CUDA_GRID_LIMIT // 2, channels_last: bool = False,
                 compile: bool = False) -> nn.Module:
    """Install the batch-splitting attention, set the memory format, compile; returns ``unet`` (in place)."""
    if hasattr(unet, "set_attn_processor") and getattr(unet, "attn_processors", None):
        unet.set_attn_processor(BatchSplitAttnProcessor(attention_max_batch))
    if channels_last:  # 2-D convolution weights only (the temporal Conv3d weights keep their layout)
        for mod in unet.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.data = mod.weight.data.contiguous(memory_format=torch.channels_last)
    if compile:
        import torch._inductor.config as inductor_config

        inductor_config.conv_1x1_as_mm = True  # 1x1 convolutions (the transformer's proj_in/out) as GEMMs
        unet.compile(dynamic=False)
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
