"""How the UNets execute: batch-split attention, attention kernels, equal chunks (exact changes only)."""

import pytest
import torch

from d2.stages.cameras import orbit_azimuths
from d2.stages.priors import PriorsConfig, TinyPriorConfig, build_tiny_prior
from d2.stages.sampling import _chunks
from d2.stages.unet_runtime import BatchSplitAttnProcessor, attention_context


def _inputs(prior, b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(b, 3, prior.resolution, prior.resolution, generator=g)
    kw = {"azimuths_deg": orbit_azimuths(t), "elevations_deg": 10.0} if prior.family == "multiview" else {}
    cond = prior.condition(imgs, cond_aug=0.02, generator=g, **kw)
    x = torch.randn(b, t, prior.latent_channels, prior.latent_size, prior.latent_size, generator=g)
    return x, cond


def _case(family, seed, sigma):
    """A fresh tiny prior, inputs and its eager D(x; sigma) (no grad)."""
    prior = build_tiny_prior(TinyPriorConfig(), family).eval()
    x, cond = _inputs(prior, 2, 3, seed=seed)
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(2).clone()
    with torch.no_grad():
        ref = prior.denoise_raw(x, sigma, cond)
    return prior, x, cond, sigma, ref


@pytest.mark.parametrize("family", ["video", "multiview"])
def test_split_attention_batch_gives_the_same_output(family):
    prior, x, cond, sigma, ref = _case(family, 0, 1.3)
    with torch.no_grad():
        calls = []
        procs = prior.unet.attn_processors
        assert procs and all(isinstance(p, BatchSplitAttnProcessor) for p in procs.values())
        for p in procs.values():  # temporal attention sees 2 * h * w sequences: force pieces of 5
            p.max_batch = 5
            inner = p.inner
            p.inner = lambda *a, _i=inner, **k: calls.append(a[1].shape[0]) or _i(*a, **k)
        split = prior.denoise_raw(x, sigma, cond)
    assert max(calls) <= 5 and len(calls) > len(procs)  # really split
    torch.testing.assert_close(split, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ref, prior.denoise_raw(x, sigma * 2, cond))  # the check can fail


def test_attention_backend_choice_keeps_the_output():
    prior, x, cond, sigma, ref = _case("video", 1, 0.7)
    with torch.no_grad():
        for backend in ("math", "cudnn", "flash", "efficient"):  # on the CPU all fall back to a valid kernel
            prior.configure_runtime(attention_backend=backend)
            torch.testing.assert_close(prior.denoise_raw(x, sigma, cond), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_backend"):
        prior.configure_runtime(attention_backend="fast")
    with pytest.raises(ValueError, match="attention_backend"):
        attention_context("fast")  # type: ignore[arg-type]


def test_priors_config_validates_runtime_knobs():
    with pytest.raises(ValueError):
        PriorsConfig(attention_backend="fast")
    with pytest.raises(ValueError):
        PriorsConfig(attention_max_batch=0)


@pytest.mark.parametrize("n,size,lengths", [
    (21, 5, [3] * 7), (25, 5, [5] * 5), (21, 7, [7] * 3), (8, 4, [4, 4]), (3, 5, [3]),
    (23, 5, [5, 4, 5, 4, 5]), (1, 1, [1]), (7, 2, [2, 2, 1, 2]),
])
def test_chunks_are_equal_where_cheap(n, size, lengths):
    sl = _chunks(n, size)
    assert [s.stop - s.start for s in sl] == lengths
    assert sl[0].start == 0 and sl[-1].stop == n and all(a.stop == b.start for a, b in zip(sl, sl[1:]))


@pytest.mark.slow
@pytest.mark.parametrize("knobs", [{}, {"temporal_conv": "gemm", "temporal_norm": "framewise", "compile_freezing": True}],
                         ids=["default", "gemm-framewise-frozen"])
def test_compiled_unet_matches_eager(knobs):
    """priors.compile: same D(x; sigma) as eager (float32 on the CPU), state-dict keys unchanged (~1 min each)."""
    from d2.stages.unet_runtime import no_compile

    prior, x, cond, sigma, ref = _case("video", 2, [0.5, 3.0])
    prior.requires_grad_(False)
    keys = list(prior.unet.state_dict())
    with torch.no_grad():
        prior.configure_runtime(compile=True, **knobs)
        assert prior.unet._compiled_call_impl is not None
        out = prior.denoise_raw(x, sigma, cond)
        with no_compile(prior.unet):
            eager = prior.denoise_raw(x, sigma, cond)
    assert list(prior.unet.state_dict()) == keys
    tol = 1e-5 if knobs else 0.0  # the GEMM temporal convolution rounds differently from Conv3d
    torch.testing.assert_close(eager, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_channels_last_keeps_the_output():
    prior, x, cond, sigma, ref = _case("multiview", 3, 2.0)
    with torch.no_grad():
        prior.configure_runtime(channels_last=True)
        convs = [m for m in prior.unet.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
        torch.testing.assert_close(prior.denoise_raw(x, sigma, cond), ref, rtol=1e-4, atol=1e-5)


# ---- exact reformulations: single-key cross-attention, temporal convolution as a GEMM ----


def _attention(**kw):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16, **kw).eval()
    attn.set_processor(AttnProcessor2_0())
    return attn


def test_single_key_attention_equals_softmax_attention():
    from d2.stages.unet_runtime import single_key_attention

    attn = _attention()
    h = torch.randn(3, 7, 32)
    ctx = torch.randn(3, 1, 16)
    with torch.no_grad():
        ref = attn(h, encoder_hidden_states=ctx)
        out = single_key_attention(attn, h, ctx)
    assert out is not None and out.shape == ref.shape == (3, 7, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0], out[1])  # per-sample context really used
    # where it does not apply, it says so: two keys, self-attention shape, training mode
    assert single_key_attention(attn, h, torch.randn(3, 2, 16)) is None
    assert single_key_attention(attn.train(), h, ctx) is None
    assert single_key_attention(_attention(residual_connection=True), h, ctx) is None


@pytest.mark.parametrize("family", ["video", "multiview"])
def test_cross_attention_shortcut_keeps_the_output(family):
    from d2.stages.unet_runtime import BatchSplitAttnProcessor

    prior, x, cond, sigma, _ = _case(family, 4, 0.9)
    counts = {}
    outs = {}
    for shortcut in (False, True):
        prior.configure_runtime(cross_attention_shortcut=shortcut)
        procs = list(prior.unet.attn_processors.values())
        assert all(isinstance(p, BatchSplitAttnProcessor) and p.single_key_shortcut == shortcut for p in procs)
        calls = []
        for p in procs:
            inner = p.inner
            p.inner = lambda *a, _i=inner, **k: calls.append(1) or _i(*a, **k)
        with torch.no_grad():
            outs[shortcut] = prior.denoise_raw(x, sigma, cond)
        counts[shortcut] = len(calls)
    assert counts[True] == counts[False] // 2 > 0  # every cross-attention (half of them) skipped the kernel
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,cin,cout", [(3, 8, 16), (5, 6, 4), (1, 4, 4)])
def test_temporal_conv_as_gemm_equals_conv3d(k, cin, cout):
    from d2.stages.unet_runtime import TemporalConvAsGemm, temporal_conv_as_gemm

    torch.manual_seed(k)
    model = torch.nn.Sequential(torch.nn.Conv3d(cin, cout, (k, 1, 1), padding=((k - 1) // 2, 0, 0)),
                                torch.nn.Conv3d(cout, cout, (3, 3, 3), padding=1))  # not temporal: left alone
    x = torch.randn(2, cin, 7, 5, 6)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        assert temporal_conv_as_gemm(model) == 1 and type(model[0]) is TemporalConvAsGemm
        assert type(model[1]) is torch.nn.Conv3d and list(model.state_dict()) == keys
        out = model(x)
        assert temporal_conv_as_gemm(model, enable=False) == 1 and type(model[0]) is torch.nn.Conv3d
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not TemporalConvAsGemm.applies(torch.nn.Conv3d(4, 4, (3, 1, 1), padding=(0, 0, 0)))  # 'valid' padding


def test_tiny_prior_with_gemm_temporal_conv_keeps_the_output():
    from d2.stages.unet_runtime import TemporalConvAsGemm

    prior, x, cond, sigma, ref = _case("video", 5, 1.7)
    prior.configure_runtime(temporal_conv="gemm")
    assert sum(type(m) is TemporalConvAsGemm for m in prior.unet.modules()) > 0
    with torch.no_grad():
        torch.testing.assert_close(prior.denoise_raw(x, sigma, cond), ref, rtol=1e-5, atol=1e-5)
    prior.configure_runtime(temporal_conv="conv3d")
    assert not any(type(m) is TemporalConvAsGemm for m in prior.unet.modules())
    with pytest.raises(ValueError, match="temporal_conv"):
        prior.configure_runtime(temporal_conv="fft")
    with pytest.raises(ValueError, match="compile_mode"):
        prior.configure_runtime(compile=True, compile_mode="fastest")
    for bad in ({"temporal_conv": "fft"}, {"compile_mode": "fastest"}):
        with pytest.raises(ValueError):
            PriorsConfig(**bad)


@pytest.mark.parametrize("layout", ["contiguous", "frame-major"])
def test_framewise_group_norm_equals_group_norm(layout):
    from d2.stages.unet_runtime import FramewiseGroupNorm, framewise_group_norm

    torch.manual_seed(1)
    norm = torch.nn.GroupNorm(4, 12, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 12, 5, 3, 4) * torch.linspace(0.5, 3.0, 5).view(1, 1, 5, 1, 1) + 2.0  # frames differ
    if layout == "frame-major":  # what the temporal ResNet blocks see: a permuted [B, F, C, H, W]
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    with torch.no_grad():
        ref = norm(x)
        assert framewise_group_norm(norm) == 1 and type(norm) is FramewiseGroupNorm
        out = norm(x)
        torch.testing.assert_close(norm(x[:, :, 0]), torch.nn.functional.group_norm(  # 4-D: plain GroupNorm
            x[:, :, 0], 4, norm.weight, norm.bias, 1e-6))
        half = norm(x.to(torch.bfloat16))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, rtol=0.05, atol=0.05)
    assert framewise_group_norm(norm, enable=False) == 1 and type(norm) is torch.nn.GroupNorm


def test_tiny_prior_with_framewise_norm_keeps_the_output():
    from d2.stages.unet_runtime import FramewiseGroupNorm

    prior, x, cond, sigma, ref = _case("multiview", 6, 0.4)
    prior.configure_runtime(temporal_norm="framewise")
    norms = [m for m in prior.unet.modules() if type(m) is FramewiseGroupNorm]
    five_d = []
    for m in norms:
        m.register_forward_pre_hook(lambda _m, a: five_d.append(a[0].ndim == 5))
    with torch.no_grad():
        torch.testing.assert_close(prior.denoise_raw(x, sigma, cond), ref, rtol=1e-5, atol=1e-5)
    assert sum(five_d) > 0  # the temporal blocks' norms took the framewise path
    with pytest.raises(ValueError, match="temporal_norm"):
        prior.configure_runtime(temporal_norm="layer")


def test_every_runtime_knob_is_a_priors_field_and_reaches_the_unet():
    import inspect

    from d2.stages.priors import Prior, load_priors, runtime_options
    from d2.stages.unet_runtime import FramewiseGroupNorm, TemporalConvAsGemm

    params = set(inspect.signature(Prior.configure_runtime).parameters) - {"self"}
    assert set(runtime_options(PriorsConfig())) == params
    before = torch.backends.cudnn.benchmark
    try:
        cfg = PriorsConfig(backend="tiny", cross_attention_shortcut=False, temporal_conv="gemm",
                           temporal_norm="framewise", cudnn_benchmark=True)
        video, mv = load_priors(cfg)
        assert torch.backends.cudnn.benchmark is True
        for prior in (video, mv):
            mods = list(prior.unet.modules())
            assert any(type(m) is TemporalConvAsGemm for m in mods) and any(type(m) is FramewiseGroupNorm for m in mods)
            assert not any(p.single_key_shortcut for p in prior.unet.attn_processors.values())
    finally:
        torch.backends.cudnn.benchmark = before
