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
def test_compiled_unet_matches_eager():
    """priors.compile: same D(x; sigma) as eager (float32 on the CPU), state-dict keys unchanged (~1 min)."""
    from d2.stages.unet_runtime import no_compile

    prior, x, cond, sigma, ref = _case("video", 2, [0.5, 3.0])
    keys = list(prior.unet.state_dict())
    with torch.no_grad():
        prior.configure_runtime(compile=True)
        assert prior.unet._compiled_call_impl is not None
        out = prior.denoise_raw(x, sigma, cond)
        with no_compile(prior.unet):
            eager = prior.denoise_raw(x, sigma, cond)
    assert list(prior.unet.state_dict()) == keys
    torch.testing.assert_close(eager, ref, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_channels_last_keeps_the_output():
    prior, x, cond, sigma, ref = _case("multiview", 3, 2.0)
    with torch.no_grad():
        prior.configure_runtime(channels_last=True)
        convs = [m for m in prior.unet.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
        torch.testing.assert_close(prior.denoise_raw(x, sigma, cond), ref, rtol=1e-4, atol=1e-5)
