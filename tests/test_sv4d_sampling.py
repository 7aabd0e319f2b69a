"""SV4D / SV4D 2.0 loops (d2/stages/sv4d_sampling.py) against literal re-writes of Stability's scripts.

The second half of this file re-writes, as literally as a test can, what Stability's
``scripts/sampling/simple_video_sample_4d.py`` and ``simple_video_sample_4d2.py`` run
(generative-models 0ad7de9): the scripts' ``sample`` bodies from the camera set-up on, the
helpers of ``scripts/demo/sv4d_helpers.py`` they call and the sgm classes those build
(conditioner and embedders, EDM discretization, Euler sampler, guiders, denoiser, wrapper):
same variable names, same order of operations, torch's global generator seeded as the scripts
seed it. Left out: file and video I/O, printing, device moves and autocast (CPU, float32),
``load_model`` (the engine is built here) and ``sample_sv3d`` (SV4D's reference views are
given: our reference orbit put where the script reads SV3D's views). sgm itself is not
importable here (omegaconf, einops, its training stack), hence the re-write;
tests/fixtures/check_sv4d_against_sgm.py (run by hand) swaps sgm's classes and the helpers'
own functions back in and finds the same results (~1e-5).

Components: a tiny multi-view prior (VAE 4 x 4 latents, per-image decoder, CLIP) and
:class:`TinySgmUNet`, a random-weight stand-in with sgm ``SpatialUNetModelWithTime.forward``'s
signature that uses every input (x, timesteps, context, y, cond_view, cond_motion,
image_only_indicator, num_video_frames) and mixes frames and views by position; the parity tests
run again with the ported network itself at tiny size (:func:`real_components`). The windows keep the scripts'
counts (5 x 8 and 12 x 4 per window, 21 frames, 9 / 5 views); only pixels, widths and steps are
small.

Precision. Both sides run float32 but round differently in the last bits: the sigmas (float64
here, float32 in sgm) and CPU convolutions of different batch sizes (the script encodes 8
images and decodes 4 latents per call, we a window at once and one latent per call). The first
Euler step from sigma 700 cancels two numbers near 700 |noise|, where one float32 ulp is 6e-5
to 2.4e-4, so last-bit differences can come out as a few of those ulps: ``ATOL`` = 1e-3
absolute on latents of size ~1 (measured: < 1e-5 with 3-4 steps, 2.4e-4 with 2 steps). A real
difference (a scale, a window, an anchor, a noise draw) moves them by > 1e-2.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from d2.stages.priors import TinyPriorConfig, build_tiny_prior
from d2.stages.sv4d_sampling import (SV4DSamplingConfig, check_matrix_shape, components_from_prior, guider_scales,
                                     model_cameras, sample_sv4d_matrix, sinusoid, window_condition, window_plan)

RES = 8  # image side: the tiny VAE (scale 2) gives 4 x 4 latents of 4 channels
VAE_F = 2  # the scripts' F (8 for the real first stage)
WIDTHS = (8, 16, 16)  # vector widths (noise level, polar, azimuth); the real configs: 256, 512, 512
SUBSAMPLED = [0, 2, 5, 7, 9, 12, 14, 16, 19]  # SV4D script's subsampled_views
ATOL = 1e-3  # float32 at |x| ~ 700 |noise| (one ulp: 6e-5 to 2.4e-4), see the module docstring


class TinySgmUNet(nn.Module):
    """Random weights, sgm ``SpatialUNetModelWithTime.forward``'s signature; every input changes the output."""

    def __init__(self, latent_channels: int = 4, model_channels: int = 16, context_dim: int = 32,
                 adm_in_channels: int = sum(WIDTHS), max_frames: int = 12, max_views: int = 8) -> None:
        super().__init__()
        mc = model_channels
        self.model_channels = mc
        self.inp = nn.Conv2d(2 * latent_channels, mc, 3, padding=1)
        self.time_embed = nn.Linear(mc, mc)
        self.label_emb = nn.Linear(adm_in_channels, mc)
        self.ctx = nn.Linear(context_dim, mc)
        self.view = nn.Conv2d(latent_channels, mc, 1)
        self.motion = nn.Conv2d(latent_channels, mc, 1)
        self.pos_t = nn.Parameter(torch.randn(max_frames, mc) * 0.3)
        self.pos_v = nn.Parameter(torch.randn(max_views, mc) * 0.3)
        self.mix = nn.Parameter(torch.randn(2) * 0.5)
        self.out = nn.Conv2d(mc, latent_channels, 3, padding=1)

    def forward(self, x, timesteps, context=None, y=None, cam=None, time_context=None, num_video_frames=None,
                image_only_indicator=None, cond_view=None, cond_motion=None, time_step=None):
        b, t, _ = context.shape  # as sgm's motion attention reads the batch: b windows of t frames x v views
        v = cond_view.shape[0] // b
        n, (h, w) = num_video_frames, x.shape[-2:]
        assert n == t * v and x.shape[0] == b * n and y.shape[0] == b * n and cond_motion.shape[0] == b * t
        emb = self.time_embed(sinusoid(timesteps, self.model_channels).to(x.dtype)) + self.label_emb(y)
        hid = (self.inp(x) + emb[:, :, None, None]).view(b, t, v, -1, h, w)
        hid = hid + (self.ctx(context) + self.pos_t[:t])[:, :, None, :, None, None]  # per frame: CLIP, position
        hid = hid + self.pos_v[:v][None, None, :, :, None, None]  # per view: position
        cv = Fn.interpolate(cond_view, size=(h, w), mode="bilinear")
        ind = image_only_indicator.reshape(b, t, v)[..., None, None, None]
        hid = hid + ind * self.view(cv).view(b, 1, v, -1, h, w) + self.motion(cond_motion).view(b, t, 1, -1, h, w)
        hid = torch.tanh(hid)
        mix_t, mix_v = torch.tanh(self.mix)  # attention over frames and over views, in miniature
        hid = hid + mix_t * hid.mean(1, keepdim=True) + mix_v * hid.mean(2, keepdim=True)
        return self.out(hid.reshape(b * n, -1, h, w))


def make_network() -> nn.Module:
    """The stand-in network both sides run in most tests (fast, uses every input)."""
    return TinySgmUNet()


REAL_WIDTHS = (32, 48, 48)  # vector widths of the tiny SV4DUNet: they add up to its adm_in_channels = 4 x 32


def real_components(prior: nn.Module, version: str):
    """Stability's network as ported (:class:`d2.stages.sv4d.SV4DUNet`) at tiny size with ``version``'s flags."""
    from d2.stages.sv4d import SV4DUNet, tiny_sv4d_unet_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        net = SV4DUNet(tiny_sv4d_unet_config(version, context_dim=32,
                                             adm_in_channels=sum(REAL_WIDTHS))).eval()
    return components_from_prior(prior, net, vector_widths=REAL_WIDTHS)


@pytest.fixture(scope="module")
def parts():
    prior = build_tiny_prior(TinyPriorConfig(resolution=RES, clip_image_size=RES, vae_block_out_channels=(32, 64)),
                             "multiview").eval()
    prior.configure_numerics(clip_preprocess="sgm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        net = make_network().eval()
    comps = components_from_prior(prior, net, vector_widths=WIDTHS)
    gen = torch.Generator().manual_seed(11)
    video = torch.rand(21, 3, RES, RES, generator=gen)  # [F, 3, H, W] in [0, 1]
    orbit = torch.rand(9, 3, RES, RES, generator=gen)  # [V, 3, H, W]
    return prior, comps, video, orbit


# ---------------------------------------------------------------------------------------
# our pieces on their own
# ---------------------------------------------------------------------------------------


def test_script_defaults():
    a, b, c = SV4DSamplingConfig(), SV4DSamplingConfig.sv4d2(), SV4DSamplingConfig.sv4d2_8views()
    assert (a.loop, a.frames_per_window, a.views_per_window, a.num_steps, a.guider, a.cfg_max, a.cfg_min, a.seed) == \
        ("sv4d", 5, 8, 20, "spatiotemporal", 2.0, 1.0, 23)
    assert (b.loop, b.frames_per_window, b.views_per_window, b.stride, b.num_steps, b.guider, b.cfg_max) == \
        ("sv4d2", 12, 4, 12, 50, "linear", 2.0)
    assert (c.frames_per_window, c.views_per_window, c.stride, c.guider, c.cfg_max, c.cfg_min) == \
        (5, 8, 4, "spatiotemporal", 2.5, 1.5)
    assert (a.sigma_min, a.sigma_max, a.rho) == (0.002, 700.0, 7.0)
    assert window_plan(a, 21) == {"anchors": [4, 8, 12, 16, 20],
                                  "windows": [list(range(s, s + 5)) for s in range(0, 17, 4)]}
    assert window_plan(b, 21)["windows"] == [list(range(12)), list(range(9, 21))]  # the last one clamped
    assert window_plan(b, 24)["windows"] == [list(range(12)), list(range(12, 24))]
    assert window_plan(c, 21)["windows"] == [list(range(s, s + 5)) for s in range(0, 17, 4)]
    with pytest.raises(ValueError, match="window_stride"):
        SV4DSamplingConfig(window_stride=4)


def test_guider_scales_follow_the_frame_view_order():
    s = guider_scales(SV4DSamplingConfig()).view(5, 8)  # frame-major: [t, v]
    assert torch.allclose(s[:, 0], torch.linspace(1.0, 1.5, 5))  # the end views: the frame ramp alone
    assert torch.allclose(s[0], s[0].flip(0)) and s[0, 3] > s[0, 0]  # a triangle over the views
    assert float(s.max()) < 2.0  # sgm's triangle never reaches 1 at 8 views: max is not reached
    lin = guider_scales(SV4DSamplingConfig.sv4d2())
    assert lin.shape == (48,) and float(lin[0]) == 1.0 and float(lin[-1]) == 2.0


def test_bad_shapes_are_refused_before_any_work(parts):
    _, comps, video, orbit = parts

    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, *a, **k):
            raise AssertionError("the network ran")

    bad = type(comps)(**{**comps.__dict__, "network": Exploding()})
    az9 = [(v + 1) * 40.0 for v in range(9)]
    with pytest.raises(ValueError, match="conditions.num_views .* must be 9, got 8"):
        sample_sv4d_matrix(video, orbit[:8], az9[1:], 10.0, bad, SV4DSamplingConfig())
    with pytest.raises(ValueError, match="conditions.num_frames .* must be 21, got 20"):
        sample_sv4d_matrix(video[:20], orbit, az9, 10.0, bad, SV4DSamplingConfig())
    with pytest.raises(ValueError, match="use 21 or 25"):
        check_matrix_shape(SV4DSamplingConfig.sv4d2_8views(), 9, 23)
    with pytest.raises(ValueError, match="must be >= 12"):
        check_matrix_shape(SV4DSamplingConfig.sv4d2(), 5, 11)
    with pytest.raises(ValueError, match="pass orbit"):
        sample_sv4d_matrix(video, None, az9, 10.0, bad, SV4DSamplingConfig())
    with pytest.raises(ValueError, match="input view must be the last"):
        sample_sv4d_matrix(video, orbit, [0.0] + az9[:-1], 10.0, bad, SV4DSamplingConfig())


def test_cameras_map_our_rows_to_the_scripts_views():
    pol, az = model_cameras(SV4DSamplingConfig(), [(v + 1) * 40.0 for v in range(9)], 10.0)
    assert torch.allclose(az, torch.deg2rad(torch.arange(1, 9, dtype=torch.float64) * 40))
    assert torch.allclose(pol, torch.full((8,), math.radians(80.0), dtype=torch.float64))  # SV4D: absolute polar
    pol2, _ = model_cameras(SV4DSamplingConfig.sv4d2(), [72.0, 144.0, 216.0, 288.0, 360.0], [5.0, 0, 0, 0, 10.0])
    assert torch.allclose(pol2, torch.tensor([95.0, 100, 100, 100], dtype=torch.float64).deg2rad())  # relative + 90


def test_window_condition_shapes_batch_order_and_branches(parts):
    _, comps, video, orbit = parts
    frames, views = video[:5] * 2 - 1, orbit[:8] * 2 - 1
    pol, az = model_cameras(SV4DSamplingConfig(), [(v + 1) * 40.0 for v in range(9)], 10.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        wc = window_condition(frames, views, pol, az, comps, gen)
        z = comps.encode(frames)
    c, uc = wc.c, wc.uc
    assert c["crossattn"].shape == (1, 5, 32) and c["concat"].shape == (40, 4, 4, 4)
    assert c["vector"].shape == (40, sum(WIDTHS)) and c["cond_view"].shape == (8, 4, 4, 4)
    assert c["cond_motion"].shape == (5, 4, 4, 4)
    # concat is frame-major (sample t * 8 + v holds frame t), each copy noised on its own (1e-5)
    per_frame = c["concat"].view(5, 8, 4, 4, 4)
    assert torch.allclose(per_frame, z[:, None].expand(-1, 8, -1, -1, -1), atol=1e-3)
    assert (per_frame[:, 0] != per_frame[:, 1]).any()
    assert torch.allclose(c["vector"][:, :8], sinusoid(torch.full((40,), 1e-5), 8))
    assert torch.allclose(c["vector"][9, 8:24], sinusoid(pol[1:2].float(), 16)[0])  # sample 9 = frame 1, view 1
    assert torch.allclose(c["vector"][9, 24:], sinusoid(az[1:2].float(), 16)[0])
    for k in ("crossattn", "concat", "cond_view", "cond_motion"):
        assert uc[k].shape == c[k].shape and not uc[k].any() and c[k].any()
    assert not uc["vector"][:, :8].any() and torch.equal(uc["vector"][:, 8:], c["vector"][:, 8:])
    # the scripts' draws: per conditioner call (c, then uc) [1] + the images' noise for cond_frames, cond_view,
    # cond_motion; the generator is left where the script's is
    ref = torch.Generator().manual_seed(0)
    for _call in ("c", "uc"):
        for n in (40, 8, 5):
            torch.randn((1,), generator=ref)
            torch.randn((n, 3, RES, RES), generator=ref)
    assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=ref))
    with torch.no_grad():
        first = window_condition(frames, None, pol, az, comps, torch.Generator().manual_seed(0), multiview=False)
    assert first.image_only_indicator == 0.0 and not first.c["cond_view"].any()


# ---------------------------------------------------------------------------------------
# Stability's sgm pieces, re-written literally (rearrange / repeat spelled with view / repeat)
# ---------------------------------------------------------------------------------------


def default(val, d):
    return val if val is not None else d


def append_dims(x, target_dims):
    dims_to_append = target_dims - x.ndim
    return x[(...,) + (None,) * dims_to_append]


def append_zero(x):
    return torch.cat([x, x.new_zeros([1])])


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
                      ).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return embedding


class EDMDiscretization:
    def __init__(self, sigma_min=0.002, sigma_max=80.0, rho=7.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho

    def __call__(self, n, do_append_zero=True, device="cpu", flip=False):
        sigmas = self.get_sigmas(n, device=device)
        sigmas = append_zero(sigmas) if do_append_zero else sigmas
        return sigmas if not flip else torch.flip(sigmas, (0,))

    def get_sigmas(self, n, device="cpu"):
        ramp = torch.linspace(0, 1, n, device=device)
        min_inv_rho = self.sigma_min ** (1 / self.rho)
        max_inv_rho = self.sigma_max ** (1 / self.rho)
        sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** self.rho
        return sigmas


class LinearPredictionGuider:
    def __init__(self, max_scale, num_frames, min_scale=1.0, additional_cond_keys=None):
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.num_frames = num_frames
        self.scale = torch.linspace(min_scale, max_scale, num_frames).unsqueeze(0)
        additional_cond_keys = default(additional_cond_keys, [])
        if isinstance(additional_cond_keys, str):
            additional_cond_keys = [additional_cond_keys]
        self.additional_cond_keys = additional_cond_keys

    def __call__(self, x, sigma):
        x_u, x_c = x.chunk(2)
        x_u = x_u.reshape(-1, self.num_frames, *x_u.shape[1:])  # "(b t) ... -> b t ..."
        x_c = x_c.reshape(-1, self.num_frames, *x_c.shape[1:])
        scale = self.scale.repeat(x_u.shape[0], 1)  # "1 t -> b t"
        scale = append_dims(scale, x_u.ndim).to(x_u.device)
        return (x_u + scale * (x_c - x_u)).flatten(0, 1)  # "b t ... -> (b t) ..."

    def prepare_inputs(self, x, s, c, uc):
        c_out = dict()
        for k in c:
            if k in ["vector", "crossattn", "concat"] + self.additional_cond_keys:
                c_out[k] = torch.cat((uc[k], c[k]), 0)
            else:
                c_out[k] = c[k]
        return torch.cat([x] * 2), torch.cat([s] * 2), c_out


class SpatiotemporalPredictionGuider(LinearPredictionGuider):
    def __init__(self, max_scale, num_frames, num_views=1, min_scale=1.0, additional_cond_keys=None):
        super().__init__(max_scale, num_frames, min_scale, additional_cond_keys)
        V = num_views
        T = num_frames // V
        scale = torch.zeros(num_frames).view(T, V)
        scale += torch.linspace(0, 1, T)[:, None] * 0.5
        scale += self.triangle_wave(torch.linspace(0, 1, V))[None, :] * 0.5
        scale = scale.flatten()
        self.scale = (scale * (max_scale - min_scale) + min_scale).unsqueeze(0)

    def triangle_wave(self, values, period=1):
        return 2 * (values / period - torch.floor(values / period + 0.5)).abs()


def to_d(x, sigma, denoised):
    return (x - denoised) / append_dims(sigma, x.ndim)


class EulerEDMSampler:
    def __init__(self, num_steps, discretization, guider, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
        self.num_steps = num_steps
        self.discretization = discretization
        self.guider = guider
        self.s_churn = s_churn
        self.s_tmin = s_tmin
        self.s_tmax = s_tmax
        self.s_noise = s_noise

    def prepare_sampling_loop(self, x, cond, uc=None, num_steps=None):
        sigmas = self.discretization(self.num_steps if num_steps is None else num_steps)
        uc = default(uc, cond)
        x *= torch.sqrt(1.0 + sigmas[0] ** 2.0)
        num_sigmas = len(sigmas)
        s_in = x.new_ones([x.shape[0]])
        return x, s_in, sigmas, num_sigmas, cond, uc

    def denoise(self, x, denoiser, sigma, cond, uc):
        denoised = denoiser(*self.guider.prepare_inputs(x, sigma, cond, uc))
        denoised = self.guider(denoised, sigma)
        return denoised

    def euler_step(self, x, d, dt):
        return x + dt * d

    def possible_correction_step(self, euler_step, x, d, dt, next_sigma, denoiser, cond, uc):
        return euler_step

    def sampler_step(self, sigma, next_sigma, denoiser, x, cond, uc=None, gamma=0.0):
        sigma_hat = sigma * (gamma + 1.0)
        if gamma > 0:
            eps = torch.randn_like(x) * self.s_noise
            x = x + eps * append_dims(sigma_hat**2 - sigma**2, x.ndim) ** 0.5
        denoised = self.denoise(x, denoiser, sigma_hat, cond, uc)
        d = to_d(x, sigma_hat, denoised)
        dt = append_dims(next_sigma - sigma_hat, x.ndim)
        euler_step = self.euler_step(x, d, dt)
        x = self.possible_correction_step(euler_step, x, d, dt, next_sigma, denoiser, cond, uc)
        return x

    def __call__(self, denoiser, x, cond, uc=None, num_steps=None):
        x, s_in, sigmas, num_sigmas, cond, uc = self.prepare_sampling_loop(x, cond, uc, num_steps)
        for i in range(num_sigmas - 1):
            gamma = (min(self.s_churn / (num_sigmas - 1), 2**0.5 - 1)
                     if self.s_tmin <= sigmas[i] <= self.s_tmax else 0.0)
            x = self.sampler_step(s_in * sigmas[i], s_in * sigmas[i + 1], denoiser, x, cond, uc, gamma)
        return x


class Denoiser:  # with VScalingWithEDMcNoise
    def scaling(self, sigma):
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / (sigma**2 + 1.0) ** 0.5
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise

    def __call__(self, network, input, sigma, cond, **additional_model_inputs):
        sigma_shape = sigma.shape
        sigma = append_dims(sigma, input.ndim)
        c_skip, c_out, c_in, c_noise = self.scaling(sigma)
        c_noise = c_noise.reshape(sigma_shape)
        return network(input * c_in, c_noise, cond, **additional_model_inputs) * c_out + input * c_skip


class OpenAIWrapper:
    def __init__(self, diffusion_model):
        self.diffusion_model = diffusion_model

    def __call__(self, x, t, c, **kwargs):
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn", None), y=c.get("vector", None),
                                    cond_view=c.get("cond_view", None), cond_motion=c.get("cond_motion", None),
                                    **kwargs)


class ZeroSampler:
    def __call__(self, n_samples, rand=None):
        return torch.zeros_like(default(rand, torch.randn((n_samples,)))) + 1.0e-5


class ConcatTimestepEmbedderND:
    def __init__(self, outdim, input_key):
        self.outdim = outdim
        self.input_key = input_key

    def __call__(self, x):
        if x.ndim == 1:
            x = x[:, None]
        assert len(x.shape) == 2
        b, dims = x.shape[0], x.shape[1]
        x = x.reshape(b * dims)  # "b d -> (b d)"
        emb = timestep_embedding(x, self.outdim)
        emb = emb.reshape(b, dims * self.outdim)  # "(b d) d2 -> b (d d2)"
        return emb


class VideoPredictionEmbedderWithEncoder:
    def __init__(self, n_cond_frames, encode, input_key, sigma_cond=None, en_and_decode_n_samples_a_time=None):
        self.n_cond_frames = n_cond_frames
        self.n_copies = 1
        self.encode = encode  # AutoencoderKLModeOnly.encode: the VAE's latent mode
        self.sigma_sampler = ZeroSampler()
        self.sigma_cond = sigma_cond
        self.scale_factor = 1.0
        self.en_and_decode_n_samples_a_time = en_and_decode_n_samples_a_time
        self.input_key = input_key

    def __call__(self, vid):
        if self.sigma_sampler is not None:
            b = vid.shape[0] // self.n_cond_frames
            sigmas = self.sigma_sampler(b).to(vid.device)
            if self.sigma_cond is not None:
                sigma_cond = self.sigma_cond(sigmas)
                sigma_cond = sigma_cond.repeat_interleave(self.n_cond_frames, 0)  # "b d -> (b t) d"  # For SV4D
            sigmas = sigmas.repeat_interleave(self.n_cond_frames, 0)  # "b -> (b t)"
            noise = torch.randn_like(vid)
            vid = vid + noise * append_dims(sigmas, vid.ndim)
        n_samples = (self.en_and_decode_n_samples_a_time if self.en_and_decode_n_samples_a_time is not None
                     else vid.shape[0])
        n_rounds = math.ceil(vid.shape[0] / n_samples)
        all_out = []
        for n in range(n_rounds):
            out = self.encode(vid[n * n_samples: (n + 1) * n_samples])
            all_out.append(out)
        vid = torch.cat(all_out, dim=0)
        vid *= self.scale_factor
        return_val = (vid, sigma_cond) if self.sigma_cond is not None else vid
        return return_val


class FrozenOpenCLIPImagePredictionEmbedder:
    def __init__(self, n_cond_frames, open_clip, input_key):
        self.n_cond_frames = n_cond_frames
        self.n_copies = 1
        self.open_clip = open_clip
        self.input_key = input_key

    def __call__(self, vid):
        vid = self.open_clip(vid)
        vid = vid.reshape(-1, self.n_cond_frames, vid.shape[-1])  # "(b t) d -> b t d"
        return vid


class GeneralConditioner:
    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1, "cond_view": 1, "cond_motion": 1}

    def __init__(self, embedders):
        self.embedders = embedders

    def __call__(self, batch, force_zero_embeddings=None):
        output = dict()
        if force_zero_embeddings is None:
            force_zero_embeddings = []
        for embedder in self.embedders:
            emb_out = embedder(batch[embedder.input_key])
            if not isinstance(emb_out, (list, tuple)):
                emb_out = [emb_out]
            for emb in emb_out:
                if embedder.input_key in ["cond_view", "cond_motion"]:
                    out_key = embedder.input_key
                else:
                    out_key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                if out_key in output:
                    output[out_key] = torch.cat((output[out_key], emb), self.KEY2CATDIM[out_key])
                else:
                    output[out_key] = emb
        return output

    def get_unconditional_conditioning(self, batch_c, batch_uc=None, force_uc_zero_embeddings=None,
                                       force_cond_zero_embeddings=None):
        if force_uc_zero_embeddings is None:
            force_uc_zero_embeddings = []
        c = self(batch_c, force_cond_zero_embeddings)
        uc = self(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings)
        return c, uc


class Engine:
    """sgm's DiffusionEngine as the scripts use it, from the tiny components (load_model's result)."""

    def __init__(self, comps, first_stage_decoder, n_time, n_view, encoding_t=8, decoding_t=4):
        self.conditioner = GeneralConditioner([
            FrozenOpenCLIPImagePredictionEmbedder(n_time, lambda x: comps.clip(x).reshape(x.shape[0], -1),
                                                  "cond_frames_without_noise"),
            VideoPredictionEmbedderWithEncoder(n_time * n_view, comps.encode, "cond_frames",
                                               sigma_cond=ConcatTimestepEmbedderND(comps.vector_widths[0], None),
                                               en_and_decode_n_samples_a_time=encoding_t),
            ConcatTimestepEmbedderND(comps.vector_widths[1], "polar_rad"),
            ConcatTimestepEmbedderND(comps.vector_widths[2], "azimuth_rad"),
            VideoPredictionEmbedderWithEncoder(n_view, comps.encode, "cond_view",
                                               en_and_decode_n_samples_a_time=encoding_t),
            VideoPredictionEmbedderWithEncoder(n_time, comps.encode, "cond_motion",
                                               en_and_decode_n_samples_a_time=encoding_t),
        ])
        self.denoiser = Denoiser()
        self.model = OpenAIWrapper(comps.network)
        self.scale_factor = comps.scale_factor
        self.en_and_decode_n_samples_a_time = decoding_t
        self.first_stage_decoder = first_stage_decoder  # the per-image Decoder of the configs' first stage
        self.decoded = []  # test: every latent batch decode_first_stage saw

    def decode_first_stage(self, z):
        self.decoded.append(z.clone())  # test: record
        z = 1.0 / self.scale_factor * z
        n_samples = default(self.en_and_decode_n_samples_a_time, z.shape[0])
        n_rounds = math.ceil(z.shape[0] / n_samples)
        all_out = []
        for n in range(n_rounds):
            out = self.first_stage_decoder(z[n * n_samples: (n + 1) * n_samples])
            all_out.append(out)
        out = torch.cat(all_out, dim=0)
        return out


# ---------------------------------------------------------------------------------------
# scripts/demo/sv4d_helpers.py, re-written literally (the functions the two scripts reach)
# ---------------------------------------------------------------------------------------


def get_unique_embedder_keys_from_conditioner(conditioner):
    return list(set([x.input_key for x in conditioner.embedders]))


def get_batch(keys, value_dict, N, device="cpu", T=None, additional_batch_uc_fields=[]):
    batch = {}
    batch_uc = {}
    for key in keys:
        if key == "cond_frames" or key == "cond_frames_without_noise" or key == "back_frames":
            batch[key] = value_dict[key]
        elif key == "polar_rad" or key == "azimuth_rad":
            batch[key] = torch.tensor(value_dict[key]).to(device).repeat(math.prod(N) // T)
        else:
            batch[key] = value_dict[key]
    if T is not None:
        batch["num_video_frames"] = T
    for key in batch.keys():
        if key not in batch_uc and isinstance(batch[key], torch.Tensor):
            batch_uc[key] = torch.clone(batch[key])
    return batch, batch_uc


def get_guider_no_st(options, key):
    guider = ["VanillaCFG", "IdentityGuider", "LinearPredictionGuider", "TrianglePredictionGuider",
              "TrapezoidPredictionGuider", "SpatiotemporalPredictionGuider"][options.get("guider", 2)]
    additional_guider_kwargs = options["additional_guider_kwargs"] if "additional_guider_kwargs" in options else {}
    if guider == "LinearPredictionGuider":
        max_scale = options.get("cfg", 1.5)
        return LinearPredictionGuider(max_scale=max_scale, num_frames=options["num_frames"], **additional_guider_kwargs)
    elif guider == "SpatiotemporalPredictionGuider":
        max_scale = options.get("cfg", 1.5)
        min_scale = options.get("min_cfg", 1.0)
        return SpatiotemporalPredictionGuider(max_scale=max_scale, min_scale=min_scale,
                                              num_frames=options["num_frames"], num_views=options["num_views"],
                                              **additional_guider_kwargs)
    raise NotImplementedError


def init_sampling_no_st(key=1, options=None):
    options = {} if options is None else options
    num_rows, num_cols = 1, 1
    steps = options.get("num_steps", 50)
    assert options.get("sampler", 0) == 0 and options.get("discretization", 1) == 1  # EulerEDMSampler, EDM
    discretization = EDMDiscretization(sigma_min=options.get("sigma_min", 0.03),
                                       sigma_max=options.get("sigma_max", 14.61), rho=options.get("rho", 3.0))
    guider = get_guider_no_st(options=options, key=key)
    sampler = EulerEDMSampler(num_steps=steps, discretization=discretization, guider=guider, s_churn=0.0,
                              s_tmin=0.0, s_tmax=999.0, s_noise=1.0)
    return sampler, num_rows, num_cols


def _value_dict(model, options, image_only_indicator, cond_motion, cond_view, polar_rad, azim_rad, image):
    """The value_dict lines run_img2vid and prepare_sampling share (verbatim in both)."""
    ukeys = set(get_unique_embedder_keys_from_conditioner(model.conditioner))
    value_dict = {}  # init_embedder_options_no_st: none of these keys is one it fills
    if "fps" not in ukeys:
        value_dict["fps"] = 6
    value_dict["is_image"] = 0
    value_dict["is_webvid"] = 0
    value_dict["image_only_indicator"] = image_only_indicator
    cond_aug = 0.00
    if cond_motion is not None:
        value_dict["cond_frames_without_noise"] = cond_motion
        value_dict["cond_frames"] = cond_motion[:, None].repeat(1, cond_view.shape[0], 1, 1, 1).flatten(0, 1)
    else:
        value_dict["cond_frames_without_noise"] = image
        value_dict["cond_frames"] = image + cond_aug * torch.randn_like(image)
    value_dict["cond_aug"] = cond_aug
    value_dict["polar_rad"] = polar_rad
    value_dict["azimuth_rad"] = azim_rad
    value_dict["rotated"] = False
    value_dict["cond_motion"] = cond_motion
    value_dict["cond_view"] = cond_view
    return value_dict


def run_img2vid(version_dict, model, image, seed=23, polar_rad=None, azim_rad=None, cond_motion=None, cond_view=None,
                decoding_t=None, cond_mv=True):
    options = version_dict["options"]
    H, W, T, C, F = version_dict["H"], version_dict["W"], version_dict["T"], version_dict["C"], version_dict["f"]
    value_dict = _value_dict(model, options, 1.0 if cond_mv else 0.0, cond_motion, cond_view, polar_rad, azim_rad,
                             image)
    options["num_frames"] = T
    sampler, num_rows, num_cols = init_sampling_no_st(options=options)
    num_samples = num_rows * num_cols
    samples = do_sample(model, sampler, value_dict, num_samples, H, W, C, F, T=T,
                        batch2model_input=["num_video_frames", "image_only_indicator"],
                        force_uc_zero_embeddings=options.get("force_uc_zero_embeddings", None),
                        force_cond_zero_embeddings=options.get("force_cond_zero_embeddings", None),
                        return_latents=False, decoding_t=decoding_t)
    return samples


def prepare_inputs(frame_indices, img_matrix, v0, view_indices, model, version_dict, seed, polars, azims):
    # forward sampling
    forward_frame_indices = frame_indices.copy()
    t0 = forward_frame_indices[0]
    image = img_matrix[t0][v0]
    cond_motion = torch.cat([img_matrix[t][v0] for t in forward_frame_indices], 0)
    cond_view = torch.cat([img_matrix[t0][v] for v in view_indices], 0)
    forward_inputs = prepare_sampling(version_dict, model, image, seed, polars, azims, cond_motion, cond_view)
    # backward sampling
    backward_frame_indices = frame_indices[::-1].copy()
    t0 = backward_frame_indices[0]
    image = img_matrix[t0][v0]
    cond_motion = torch.cat([img_matrix[t][v0] for t in backward_frame_indices], 0)
    cond_view = torch.cat([img_matrix[t0][v] for v in view_indices], 0)
    backward_inputs = prepare_sampling(version_dict, model, image, seed, polars, azims, cond_motion, cond_view)
    return forward_inputs, forward_frame_indices, backward_inputs, backward_frame_indices


def _conditioning(model, value_dict, num_samples, force_uc_zero_embeddings, force_cond_zero_embeddings, T):
    """The conditioner lines do_sample and prepare_sampling_ share (verbatim in both)."""
    batch, batch_uc = get_batch(get_unique_embedder_keys_from_conditioner(model.conditioner), value_dict,
                                num_samples, T=T, additional_batch_uc_fields=[])
    c, uc = model.conditioner.get_unconditional_conditioning(batch, batch_uc=batch_uc,
                                                             force_uc_zero_embeddings=force_uc_zero_embeddings,
                                                             force_cond_zero_embeddings=force_cond_zero_embeddings)
    for k in c:
        if not k == "crossattn":
            c[k], uc[k] = map(lambda y: y[k][: math.prod(num_samples)], (c, uc))
    return batch, c, uc


def _additional_model_inputs(batch2model_input, num_samples, value_dict, batch, T):
    additional_model_inputs = {}
    for k in batch2model_input:
        if k == "image_only_indicator":
            assert T is not None
            additional_model_inputs[k] = (torch.zeros(num_samples[0] * 2, num_samples[1])
                                          + value_dict["image_only_indicator"])
        else:
            additional_model_inputs[k] = batch[k]
    return additional_model_inputs


def do_sample(model, sampler, value_dict, num_samples, H, W, C, F, force_uc_zero_embeddings=None,
              force_cond_zero_embeddings=None, batch2model_input=None, return_latents=False, filter=None, T=None,
              additional_batch_uc_fields=None, decoding_t=None):
    force_uc_zero_embeddings = default(force_uc_zero_embeddings, [])
    batch2model_input = default(batch2model_input, [])
    with torch.no_grad():
        num_samples = [num_samples, T] if T is not None else [num_samples]
        batch, c, uc = _conditioning(model, value_dict, num_samples, force_uc_zero_embeddings,
                                     force_cond_zero_embeddings, T)
        if value_dict["image_only_indicator"] == 0:
            c["cond_view"] *= 0
            uc["cond_view"] *= 0
        additional_model_inputs = _additional_model_inputs(batch2model_input, num_samples, value_dict, batch, T)
        shape = (math.prod(num_samples), C, H // F, W // F)
        randn = torch.randn(shape)

        def denoiser(input, sigma, c):
            return model.denoiser(model.model, input, sigma, c, **additional_model_inputs)

        samples_z = sampler(denoiser, randn, cond=c, uc=uc)
        samples_x = model.decode_first_stage(samples_z)
        samples = torch.clamp((samples_x + 1.0) / 2.0, min=0.0, max=1.0)
        return samples


def prepare_sampling_(model, sampler, value_dict, num_samples, force_uc_zero_embeddings=None,
                      force_cond_zero_embeddings=None, batch2model_input=None, T=None, additional_batch_uc_fields=None):
    force_uc_zero_embeddings = default(force_uc_zero_embeddings, [])
    batch2model_input = default(batch2model_input, [])
    with torch.no_grad():
        num_samples = [num_samples, T] if T is not None else [num_samples]
        batch, c, uc = _conditioning(model, value_dict, num_samples, force_uc_zero_embeddings,
                                     force_cond_zero_embeddings, T)
        additional_model_inputs = _additional_model_inputs(batch2model_input, num_samples, value_dict, batch, T)
    return c, uc, additional_model_inputs


def do_sample_per_step(model, sampler, noisy_latents, c, uc, step, additional_model_inputs):
    with torch.no_grad():
        noisy_latents_scaled, s_in, sigmas, num_sigmas, _, _ = sampler.prepare_sampling_loop(
            noisy_latents.clone(), c, uc, sampler.num_steps)
        if step == 0:
            latents = noisy_latents_scaled
        else:
            latents = noisy_latents

        def denoiser(input, sigma, c):
            return model.denoiser(model.model, input, sigma, c, **additional_model_inputs)

        gamma = (min(sampler.s_churn / (num_sigmas - 1), 2**0.5 - 1)
                 if sampler.s_tmin <= sigmas[step] <= sampler.s_tmax else 0.0)
        samples_z = sampler.sampler_step(s_in * sigmas[step], s_in * sigmas[step + 1], denoiser, latents, c, uc, gamma)
    return samples_z


def prepare_sampling(version_dict, model, image, seed=23, polar_rad=None, azim_rad=None, cond_motion=None,
                     cond_view=None):
    options = version_dict["options"]
    T = version_dict["T"]
    value_dict = _value_dict(model, options, 1.0, cond_motion, cond_view, polar_rad, azim_rad, image)
    options["num_frames"] = T
    sampler, num_rows, num_cols = init_sampling_no_st(options=options)
    num_samples = num_rows * num_cols
    c, uc, additional_model_inputs = prepare_sampling_(
        model, sampler, value_dict, num_samples,
        force_uc_zero_embeddings=options.get("force_uc_zero_embeddings", None),
        force_cond_zero_embeddings=options.get("force_cond_zero_embeddings", None),
        batch2model_input=["num_video_frames", "image_only_indicator"], T=T)
    return c, uc, additional_model_inputs, sampler


RECORDED: list = []  # test: the latent matrices decode_latents saw, with their frames


def decode_latents(model, samples_z, img_matrix, frame_indices, view_indices, timesteps):
    RECORDED.append((list(frame_indices), samples_z.clone()))  # test: record
    for t in frame_indices:
        for v in view_indices:
            if True:  # t != 0 and v != 0:
                samples_x = model.decode_first_stage(samples_z[t, v][None])
                samples = torch.clamp((samples_x + 1.0) / 2.0, min=0.0, max=1.0)
                img_matrix[t][v] = samples * 2 - 1
    return img_matrix


# ---------------------------------------------------------------------------------------
# the two scripts' sample() bodies (from the model config on; SV3D replaced by the given views)
# ---------------------------------------------------------------------------------------

FORCE_UC = ["cond_frames", "cond_frames_without_noise", "cond_view", "cond_motion"]


def sv4d_script(images_v0, reference_views, comps, first_stage_decoder, num_steps=20, seed=23, elevations_deg=10.0,
                azimuths_deg=None, img_size=RES, decoding_t=4):
    """simple_video_sample_4d.py's sample(); ``reference_views`` [8, 1, 3, H, W] stand for SV3D's subsampled views."""
    T = 5  # number of frames per sample
    V = 8  # number of views per sample
    F = VAE_F  # vae factor to downsize image->latent
    C = 4
    H, W = img_size, img_size
    n_frames = 21  # number of input and output video frames
    n_views = V + 1  # number of output video views (1 input view + 8 novel views)
    n_views_sv3d = 21
    subsampled_views = np.array([0, 2, 5, 7, 9, 12, 14, 16, 19])
    version_dict = {"T": T * V, "H": H, "W": W, "C": C, "f": F, "options": {
        "discretization": 1, "cfg": 2.0, "num_views": V, "sigma_min": 0.002, "sigma_max": 700.0, "rho": 7.0,
        "guider": 5, "num_steps": num_steps, "force_uc_zero_embeddings": list(FORCE_UC),
        "additional_guider_kwargs": {"additional_cond_keys": ["cond_view", "cond_motion"]}}}
    torch.manual_seed(seed)

    # Get camera viewpoints
    if isinstance(elevations_deg, float) or isinstance(elevations_deg, int):
        elevations_deg = [elevations_deg] * n_views_sv3d
    if azimuths_deg is None:
        azimuths_deg = np.linspace(0, 360, n_views_sv3d + 1)[1:] % 360
    polars_rad = np.array([np.deg2rad(90 - e) for e in elevations_deg])
    azimuths_rad = np.array([np.deg2rad((a - azimuths_deg[-1]) % 360) for a in azimuths_deg])

    # sample_sv3d replaced: SV3D's 21 views with the given ones where the script reads them after the roll
    images_t0 = torch.zeros(n_views_sv3d, 3, H, W)
    for j, v in enumerate(subsampled_views[1:]):
        images_t0[v - 1] = reference_views[j][0]
    images_t0[-1] = images_v0[0][0]  # sample_sv3d puts the conditioning image last
    images_t0 = torch.roll(images_t0, 1, 0)  # move conditioning image to first frame

    # Initialize image matrix
    img_matrix = [[None] * n_views for _ in range(n_frames)]
    for i, v in enumerate(subsampled_views):
        img_matrix[0][i] = images_t0[v].unsqueeze(0)
    for t in range(n_frames):
        img_matrix[t][0] = images_v0[t]

    model = Engine(comps, first_stage_decoder, T, V)

    # Interleaved sampling for anchor frames
    t0, v0 = 0, 0
    frame_indices = np.arange(T - 1, n_frames, T - 1)  # [4, 8, 12, 16, 20]
    view_indices = np.arange(V) + 1
    image = img_matrix[t0][v0]
    cond_motion = torch.cat([img_matrix[t][v0] for t in frame_indices], 0)
    cond_view = torch.cat([img_matrix[t0][v] for v in view_indices], 0)
    polars = polars_rad[subsampled_views[1:]][None].repeat(T, 0).flatten()
    azims = azimuths_rad[subsampled_views[1:]][None].repeat(T, 0).flatten()
    azims = (azims - azimuths_rad[v0]) % (torch.pi * 2)
    samples = run_img2vid(version_dict, model, image, seed, polars, azims, cond_motion, cond_view, decoding_t)
    samples = samples.view(T, V, 3, H, W)
    for i, t in enumerate(frame_indices):
        for j, v in enumerate(view_indices):
            if img_matrix[t][v] is None:
                img_matrix[t][v] = samples[i, j][None] * 2 - 1

    # Dense sampling for the rest
    for t0 in np.arange(0, n_frames - 1, T - 1):  # [0, 4, 8, 12, 16]
        frame_indices = t0 + np.arange(T)
        latent_matrix = torch.randn(n_frames, n_views, C, H // F, W // F)
        polars = polars_rad[subsampled_views[1:]][None].repeat(T, 0).flatten()
        azims = azimuths_rad[subsampled_views[1:]][None].repeat(T, 0).flatten()
        azims = (azims - azimuths_rad[v0]) % (torch.pi * 2)
        # alternate between forward and backward conditioning
        forward_inputs, forward_frame_indices, backward_inputs, backward_frame_indices = prepare_inputs(
            frame_indices, img_matrix, v0, view_indices, model, version_dict, seed, polars, azims)
        for step in range(num_steps):
            if step % 2 == 1:
                c, uc, additional_model_inputs, sampler = forward_inputs
                frame_indices = forward_frame_indices
            else:
                c, uc, additional_model_inputs, sampler = backward_inputs
                frame_indices = backward_frame_indices
            noisy_latents = latent_matrix[frame_indices][:, view_indices].flatten(0, 1)
            samples = do_sample_per_step(model, sampler, noisy_latents, c, uc, step, additional_model_inputs)
            samples = samples.view(T, V, C, H // F, W // F)
            for i, t in enumerate(frame_indices):
                for j, v in enumerate(view_indices):
                    latent_matrix[t, v] = samples[i, j]
        img_matrix = decode_latents(model, latent_matrix, img_matrix, frame_indices, view_indices, T)
    return img_matrix


SV4D2_CONFIGS = {
    "sv4d2": {"T": 12, "V": 4, "version_dict": {"T": 12 * 4, "options": {
        "discretization": 1, "cfg": 2.0, "min_cfg": 2.0, "num_views": 4, "sigma_min": 0.002, "sigma_max": 700.0,
        "rho": 7.0, "guider": 2, "force_uc_zero_embeddings": list(FORCE_UC),
        "additional_guider_kwargs": {"additional_cond_keys": ["cond_view", "cond_motion"]}}}},
    "sv4d2_8views": {"T": 5, "V": 8, "version_dict": {"T": 5 * 8, "options": {
        "discretization": 1, "cfg": 2.5, "min_cfg": 1.5, "num_views": 8, "sigma_min": 0.002, "sigma_max": 700.0,
        "rho": 7.0, "guider": 5, "force_uc_zero_embeddings": list(FORCE_UC),
        "additional_guider_kwargs": {"additional_cond_keys": ["cond_view", "cond_motion"]}}}},
}


def sv4d2_script(images_v0, comps, first_stage_decoder, sv4d2_model, num_steps=50, n_frames=21, seed=23,
                 elevations_deg=0.0, azimuths_deg=None, img_size=RES, decoding_t=4):
    """simple_video_sample_4d2.py's sample(); returns img_matrix and each window's latents (frames, [T*V, C, h, w])."""
    config = SV4D2_CONFIGS[sv4d2_model]
    T = config["T"]
    V = config["V"]
    version_dict = {**config["version_dict"], "options": dict(config["version_dict"]["options"])}
    F = VAE_F  # vae factor to downsize image->latent
    C = 4
    H, W = img_size, img_size
    n_views = V + 1  # number of output video views (1 input view + 8 novel views)
    subsampled_views = np.arange(n_views)
    version_dict["H"] = H
    version_dict["W"] = W
    version_dict["C"] = C
    version_dict["f"] = F
    version_dict["options"]["num_steps"] = num_steps
    torch.manual_seed(seed)
    images_t0 = torch.zeros(n_views, 3, H, W).float()

    # Get camera viewpoints
    if isinstance(elevations_deg, float) or isinstance(elevations_deg, int):
        elevations_deg = [elevations_deg] * n_views
    if azimuths_deg is None:
        azimuths_deg = (np.array([0, 60, 120, 180, 240]) if sv4d2_model == "sv4d2"
                        else np.array([0, 30, 75, 120, 165, 210, 255, 300, 330]))
    polars_rad = np.array([np.deg2rad(90 - e) for e in elevations_deg])
    azimuths_rad = np.array([np.deg2rad((a - azimuths_deg[-1]) % 360) for a in azimuths_deg])

    # Initialize image matrix
    img_matrix = [[None] * n_views for _ in range(n_frames)]
    for i, v in enumerate(subsampled_views):
        img_matrix[0][i] = images_t0[v].unsqueeze(0)
    for t in range(n_frames):
        img_matrix[t][0] = images_v0[t]

    model = Engine(comps, first_stage_decoder, T, V)
    windows = []  # test: each window's frames and latents

    # Sampling novel-view videos
    v0 = 0
    view_indices = np.arange(V) + 1
    t0_list = range(0, n_frames, T) if sv4d2_model == "sv4d2" else range(0, n_frames - T + 1, T - 1)
    for t0 in t0_list:
        if t0 + T > n_frames:
            t0 = n_frames - T
        frame_indices = t0 + np.arange(T)
        image = img_matrix[t0][v0]
        cond_motion = torch.cat([img_matrix[t][v0] for t in frame_indices], 0)
        cond_view = torch.cat([img_matrix[t0][v] for v in view_indices], 0)
        polars = polars_rad[subsampled_views[1:]][None].repeat(T, 0).flatten()
        azims = azimuths_rad[subsampled_views[1:]][None].repeat(T, 0).flatten()
        polars = (polars - polars_rad[v0] + torch.pi / 2) % (torch.pi * 2)
        azims = (azims - azimuths_rad[v0]) % (torch.pi * 2)
        cond_mv = False if t0 == 0 else True
        samples = run_img2vid(version_dict, model, image, seed, polars, azims, cond_motion, cond_view, decoding_t,
                              cond_mv=cond_mv)
        windows.append((list(frame_indices), model.decoded[-1]))  # test: the latents do_sample decoded
        samples = samples.view(T, V, 3, H, W)
        for i, t in enumerate(frame_indices):
            for j, v in enumerate(view_indices):
                img_matrix[t][v] = samples[i, j][None] * 2 - 1
    return img_matrix, windows


# ---------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------


def _script_latents(windows, num_frames, num_views):
    """[Vw, F, C, h, w] from (frames, [T * Vw, C, h, w] or [F, V, C, h, w]) records, later windows winning."""
    out = None
    for frames, z in windows:
        if z.ndim == 5:  # SV4D's latent_matrix [F, V, ...]: the window's frames, views 1..Vw
            z = z[frames][:, 1:]
        else:
            z = z.view(len(frames), num_views - 1, *z.shape[1:])
        out = z.new_zeros((num_frames, *z.shape[1:])) if out is None else out
        for i, f in enumerate(frames):
            out[f] = z[i]
    return out.transpose(0, 1)


def _images(img_matrix, num_views):
    """The script's novel-view images [Vw, F, 3, H, W] in [-1, 1]."""
    return torch.stack([torch.cat([img_matrix[t][v] for t in range(len(img_matrix))]) for v in range(1, num_views)])


def _check(ours, info, theirs_latents, theirs_images, comps, video):
    """Ours against the script, latents and images, to float32 precision (module docstring); row V-1 = the input."""
    v = ours.shape[0]
    assert info["input_view_row"] == v - 1
    assert theirs_latents.abs().mean() > 0.1  # a non-trivial sample
    torch.testing.assert_close(ours[:-1], theirs_latents, rtol=0, atol=ATOL)
    with torch.no_grad():
        decoded = torch.stack([torch.cat([comps.decode(ours[r, f:f + 1]) for f in range(ours.shape[1])])
                               for r in range(v - 1)])
        torch.testing.assert_close(decoded, theirs_images, rtol=0, atol=ATOL)
        torch.testing.assert_close(ours[-1], comps.encode(video * 2 - 1) * comps.scale_factor)


@pytest.mark.parametrize("network", ["stand-in", "SV4DUNet"])
def test_sv4d_matches_stability_script(parts, network):
    prior, comps, video, orbit = parts
    comps = real_components(prior, "sv4d") if network == "SV4DUNet" else comps
    steps = 4  # backward, forward, backward, forward
    # the script's default cameras: SV3D's views k * 360/21 deg, k = 2, 5, ..., 19; ours, input view last
    azimuths = [k * 360.0 / 21 for k in SUBSAMPLED[1:]] + [360.0]
    cfg = SV4DSamplingConfig(num_steps=steps)
    ours, info = sample_sv4d_matrix(video, orbit, azimuths, 10.0, comps, cfg)
    assert ours.shape == (9, 21, 4, 4, 4) and info["anchors"] == [4, 8, 12, 16, 20]
    RECORDED.clear()
    with torch.random.fork_rng(devices=[]):
        images_v0 = [video[t][None] * 2 - 1 for t in range(21)]
        img_matrix = sv4d_script(images_v0, [orbit[j][None] * 2 - 1 for j in range(8)], comps, prior.image_decoder,
                                 num_steps=steps)
    _check(ours, info, _script_latents(RECORDED, 21, 9), _images(img_matrix, 9), comps, video)


@pytest.mark.parametrize("network", ["stand-in", "SV4DUNet"])
@pytest.mark.parametrize("model", ["sv4d2", "sv4d2_8views"])
def test_sv4d2_matches_stability_script(parts, model, network):
    prior, comps, video, _ = parts
    comps = real_components(prior, model) if network == "SV4DUNet" else comps
    steps = 3
    cfg = (SV4DSamplingConfig.sv4d2 if model == "sv4d2" else SV4DSamplingConfig.sv4d2_8views)(num_steps=steps)
    script_az = [0, 60, 120, 180, 240] if model == "sv4d2" else [0, 30, 75, 120, 165, 210, 255, 300, 330]
    azimuths = [float(a) for a in script_az[1:]] + [360.0]  # the script's defaults in our order
    ours, info = sample_sv4d_matrix(video, None, azimuths, 0.0, comps, cfg)
    with torch.random.fork_rng(devices=[]):
        images_v0 = [video[t][None] * 2 - 1 for t in range(21)]
        img_matrix, windows = sv4d2_script(images_v0, comps, prior.image_decoder, model, num_steps=steps)
    v = len(azimuths)
    assert info["windows"] == [w for w, _ in windows]
    _check(ours, info, _script_latents(windows, 21, v), _images(img_matrix, v), comps, video)


def test_sv4d2_with_our_uniform_orbit_is_the_script_with_those_azimuths(parts):
    prior, comps, video, _ = parts
    cfg = SV4DSamplingConfig.sv4d2(num_steps=2)
    ours, info = sample_sv4d_matrix(video, None, [72.0, 144.0, 216.0, 288.0, 360.0], 0.0, comps, cfg)
    assert info["network_azimuths_deg"] == [72.0, 144.0, 216.0, 288.0]
    with torch.random.fork_rng(devices=[]):
        images_v0 = [video[t][None] * 2 - 1 for t in range(21)]
        img_matrix, windows = sv4d2_script(images_v0, comps, prior.image_decoder, "sv4d2", num_steps=2,
                                           azimuths_deg=np.array([0, 72, 144, 216, 288]))
    _check(ours, info, _script_latents(windows, 21, 5), _images(img_matrix, 5), comps, video)
