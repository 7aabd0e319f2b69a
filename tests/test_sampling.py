"""The composed sampler: schedules, pinned-weight equivalence, Gaussian target, chunking, seeds, stage outputs."""

import hashlib
import json
import math

import pytest
import torch

from d2.stages.cameras import orbit_azimuths
from d2.stages.conditions import Conditions, write_conditions
from d2.stages.priors import GaussianPriorConfig, PriorsConfig, load_priors
from d2.stages.sampling import (
    ComposedDenoiser,
    SamplingConfig,
    build_matrix_conditions,
    edm_sample,
    ignored_knobs,
    method_matrix,
    run_sampling,
    sample_matrix,
    weights_at,
)
from d2.stages.schedules import (
    base_multiview_weight,
    karras_sigmas,
    multiview_cfg_scales,
    per_view_video_profile,
    video_cfg_scales,
)

V, F_ = 3, 4


@pytest.fixture(scope="module")
def tiny():
    return load_priors(PriorsConfig(backend="tiny"))


def _conditions(res: int, v: int = V, f: int = F_, gray: bool = False, seed: int = 0) -> Conditions:
    g = torch.Generator().manual_seed(seed)
    orbit = torch.full((v, 3, res, res), 0.5) if gray else torch.rand(v, 3, res, res, generator=g)
    video = torch.full((f, 3, res, res), 0.5) if gray else torch.rand(f, 3, res, res, generator=g)
    return Conditions(orbit=orbit, video=video, input=orbit[-1].clone(), azimuths_deg=orbit_azimuths(v),
                      elevation_deg=10.0, fov_deg=33.8, radius=2.0, input_view_index=v - 1, kind="image")


def _cfg(**kw) -> SamplingConfig:
    base = dict(num_views=V, num_frames=F_, resolution=32, num_steps=4, rollback_steps=0, progress=False,
                video_cond_aug=0.0, multiview_cond_aug=0.0, chunk_size=2)
    base.update(kw)
    return SamplingConfig(**base)


# ---------------------------------------------------------------- schedules


def test_karras_sigmas_at_chosen_steps():
    s = karras_sigmas(50, 0.002, 700.0, 7.0)
    assert s.shape == (51,) and s[-1] == 0
    assert math.isclose(s[0].item(), 700.0, rel_tol=1e-12) and math.isclose(s[49].item(), 0.002, rel_tol=1e-12)
    a, b = 700.0 ** (1 / 7), 0.002 ** (1 / 7)
    for i in (1, 10, 25, 48):
        assert math.isclose(s[i].item(), (a + i / 49 * (b - a)) ** 7, rel_tol=1e-10)
    assert bool((s[:-1] > s[1:]).all())


def test_logistic_weight_is_the_papers_s():
    n, s0, k = 50, 0.5, 20.0
    for i in (0, 10, 25, 26, 40, 49):
        s_paper = 1 - 1 / (1 + math.exp(k * (i / n - s0)))  # the paper's s (video weight)
        m = base_multiview_weight(i, n, "logistic", s0=s0, k=k, fraction="i/N")
        assert math.isclose(1 - m, s_paper, rel_tol=1e-12, abs_tol=1e-12)
        cfg = SamplingConfig(num_steps=n, weight_schedule="logistic", s0=s0, k=k,
                             step_fraction="i/N", per_view_video_weight=False)
        w_video, w_mv = weights_at(i, cfg, 21)
        assert torch.allclose(w_video, torch.full((21,), s_paper, dtype=torch.float32), atol=1e-6)
        assert torch.allclose(w_video + w_mv, torch.ones(21))
    # multi-view dominates early, video late
    assert base_multiview_weight(0, n, "logistic", s0=s0, k=k) > 0.99
    assert base_multiview_weight(49, n, "logistic", s0=s0, k=k) < 0.01
    # the authors' form: x = i/(N-1), scaled between min and max
    m = base_multiview_weight(20, n, "logistic", s0=0.6, k=15.0, w_min=0.2, w_max=0.9)
    assert math.isclose(m, 0.2 + 0.7 * (1 - 1 / (1 + math.exp(-15.0 * (20 / 49 - 0.6)))), rel_tol=1e-12)
    assert base_multiview_weight(7, n, "constant", constant=0.6) == 0.6


def test_linear_and_cosine_weights_at_every_step():
    """The authors' linear and cosine shapes of the multi-view weight, from max (first step) to min (last),
    against forms re-derived here: linear as the lerp (1 - x) max + x min, cosine through the half-angle
    identity (1 + cos(pi x)) / 2 = cos^2(pi x / 2)."""
    n, lo, hi = 50, 0.15, 0.85
    for i in range(n):
        x = i / (n - 1)  # the authors' progress
        lin = base_multiview_weight(i, n, "linear", w_min=lo, w_max=hi)
        cos = base_multiview_weight(i, n, "cosine", w_min=lo, w_max=hi)
        assert math.isclose(lin, (1 - x) * hi + x * lo, rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(cos, lo + (hi - lo) * math.cos(math.pi * x / 2) ** 2, rel_tol=1e-12, abs_tol=1e-15)
        # the cosine is symmetric about the half-way step: m(x) + m(1 - x) = min + max
        assert math.isclose(cos + base_multiview_weight(n - 1 - i, n, "cosine", w_min=lo, w_max=hi), lo + hi,
                            rel_tol=1e-12)
    for shape in ("linear", "cosine"):
        assert base_multiview_weight(0, n, shape, w_min=lo, w_max=hi) == pytest.approx(hi, abs=1e-15)
        assert base_multiview_weight(n - 1, n, shape, w_min=lo, w_max=hi) == pytest.approx(lo, abs=1e-15)
    # the paper's progress i/N stops one step short of min: x = 49/50 at the last step
    x = (n - 1) / n
    assert math.isclose(base_multiview_weight(n - 1, n, "linear", w_min=lo, w_max=hi, fraction="i/N"),
                        (1 - x) * hi + x * lo, rel_tol=1e-12)
    assert math.isclose(base_multiview_weight(n - 1, n, "cosine", w_min=lo, w_max=hi, fraction="i/N"),
                        lo + (hi - lo) * math.cos(math.pi * x / 2) ** 2, rel_tol=1e-12)
    # cosine: flat at both ends, steeper than the line half-way (slope pi/2 times the line's)
    d_end = base_multiview_weight(0, n, "cosine", w_min=lo, w_max=hi) - base_multiview_weight(1, n, "cosine",
                                                                                            w_min=lo, w_max=hi)
    d_lin = (hi - lo) / (n - 1)
    assert d_end < 0.06 * d_lin
    d_mid = (base_multiview_weight(24, n, "cosine", w_min=lo, w_max=hi)
             - base_multiview_weight(25, n, "cosine", w_min=lo, w_max=hi))
    assert d_mid == pytest.approx(math.pi / 2 * d_lin, rel=1e-3)
    m = SamplingConfig(num_steps=51, weight_schedule="cosine", logistic_min=lo, logistic_max=hi,
                       per_view_video_weight=False)
    w_video, w_mv = weights_at(25, m, 21)  # x = 1/2: half-way between max and min
    assert torch.allclose(w_mv, torch.full((21,), (lo + hi) / 2), atol=1e-7)
    assert torch.allclose(w_video + w_mv, torch.ones(21))
    with pytest.raises(ValueError, match="known: constant, logistic, linear, cosine"):
        base_multiview_weight(0, n, "quadratic")


def test_a_sweep_over_the_four_weight_schedules_validates():
    """``d2 sweep --grid sampling.weight_schedule=constant,linear,cosine,logistic``: every point is a valid
    parameter set (validated, no compute), each with its schedule; a misspelt schedule is refused by name."""
    from d2.config import ParamsError, load_params
    from d2.validation import InputError, check_grid, grid_points, parse_grid

    axis = "sampling.weight_schedule=constant,linear,cosine,logistic"
    for preset in ("authors", "paper"):
        from d2.config import preset_path

        base = load_params(preset_path(preset))
        points = check_grid(base, [axis])
        assert [p.sampling.weight_schedule for p in points] == ["constant", "linear", "cosine", "logistic"]
        expanded = grid_points(base, parse_grid([axis]))
        assert [ov for _, ov, _ in expanded] == [[f"sampling.weight_schedule={s}"] for s in
                                                 ("constant", "linear", "cosine", "logistic")]
        assert all(p.sampling.model_dump(exclude={"weight_schedule"}) == base.sampling.model_dump(
            exclude={"weight_schedule"}) for _, _, p in expanded)
    with pytest.raises((InputError, ParamsError), match="weight_schedule"):
        check_grid(base, ["sampling.weight_schedule=constant,cosin"])


def test_per_view_profile_matches_the_authors_table():
    authors = [0.91311939, 0.68267051, 0.38873953, 0.13347406, 0.00558459, 0.04951557, 0.25, 0.53736505,
               0.8117449, 0.9777864, 0.9777864, 0.8117449, 0.53736505, 0.25, 0.04951557, 0.00558459,
               0.13347406, 0.38873953, 0.68267051, 0.91311939, 1.0]  # 0.5 (1 + cos(2 pi (v+1) / 10.5))
    expect = 1 - 0.75 * (1 - torch.tensor(authors, dtype=torch.float64))
    torch.testing.assert_close(per_view_video_profile(21, 0.75), expect, atol=1e-7, rtol=0)
    cfg = SamplingConfig(weight_schedule="constant", w_multiview_constant=0.6)  # the authors' constant 0.6, per-view on
    w_video, w_mv = weights_at(3, cfg, 21)
    torch.testing.assert_close(w_video.double(), expect * 0.4, atol=1e-6, rtol=0)
    torch.testing.assert_close(w_mv.double(), 1 - expect * 0.4, atol=1e-6, rtol=0)


def test_cfg_scales():
    torch.testing.assert_close(video_cfg_scales(25, 1.5, 3.0)[[0, 12, 24]], torch.tensor([1.5, 2.25, 3.0]))
    assert bool((multiview_cfg_scales(21, "constant", 2.5) == 2.5).all())
    tri = multiview_cfg_scales(21, "triangle", 2.5, 1.0)
    torch.testing.assert_close(tri[[0, 5, 10, 15, 20]], torch.tensor([1.0, 1.75, 2.5, 1.75, 1.0]))


# ---------------------------------------------------------------- pinned weights, methods


def _plain_euler(prior, cond, noise, cfg_scale, sigmas):
    """Independent single-model deterministic Euler sampler over one batch of sequences."""
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        d = prior.denoise(x, torch.full((x.shape[0],), s), cond, cfg_scale)
        x = x + (sn - s) * (x - d) / s
    return x


@pytest.mark.parametrize("method", ["video_only", "multiview_only"])
def test_the_extreme_methods_are_independent_single_model_samples(tiny, method):
    """video_only: every row an independent video-prior sample with that row's noise; multiview_only:
    every column an independent multi-view sample. The same bytes as the composition with its weight
    schedule pinned to that extreme (how the miniature experiment ran them before the methods)."""
    video, mv = tiny
    cfg = _cfg(method=method)
    cond = _conditions(32)
    noise = torch.randn(V, F_, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    got = sample_matrix(video, mv, cond, cfg, noise=noise)
    pinned = _cfg(weight_schedule="constant", w_multiview_constant=0.0 if method == "video_only" else 1.0,
                  per_view_video_weight=False)
    assert torch.equal(got, sample_matrix(video, mv, cond, pinned, noise=noise))
    sigmas = karras_sigmas(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    with torch.no_grad():
        if method == "video_only":  # row by row, row v conditioned on orbit view v
            scale = torch.linspace(1.5, 3.0, F_)[None]
            for v in range(V):
                c = video.condition(cond.orbit[v:v + 1], cond_aug=0.0, fps_id=24, motion_bucket_id=127)
                row = _plain_euler(video, c, noise[v:v + 1], scale, sigmas)[0]
                torch.testing.assert_close(got[v], row, atol=2e-4, rtol=1e-4)
        else:  # column by column, column f conditioned on video frame f with the orbit cameras
            for f in range(F_):
                c = mv.condition(cond.video[f:f + 1], cond_aug=0.0, azimuths_deg=orbit_azimuths(V),
                                 elevations_deg=10.0)
                col = _plain_euler(mv, c, noise[:, f][None], torch.full((1, V), 2.5), sigmas)[0]
                torch.testing.assert_close(got[:, f], col, atol=2e-4, rtol=1e-4)


def test_diffusion2_is_the_composed_sampler_byte_for_byte(tiny, tmp_path):
    """The default method writes the matrix the composed denoiser gives when driven by hand (the
    stage's code path before it had methods): same seeded draws, same bytes."""
    video, mv = tiny
    cond = _conditions(32)
    write_conditions(cond, tmp_path / "cond")
    cfg = _cfg(num_steps=3, rollback_steps=1, video_cond_aug=0.02, multiview_cond_aug=0.01)
    assert cfg.method == "diffusion2"
    out = run_sampling(tmp_path / "cond", tmp_path / "m", cfg, tiny)
    got = torch.load(out / "latents.pt", weights_only=True)["latents"]
    from d2.stages.conditions import load_conditions

    gen = torch.Generator().manual_seed(cfg.seed)
    vcond, mcond = build_matrix_conditions(video, mv, load_conditions(tmp_path / "cond"), cfg, gen)
    noise = torch.randn((V, F_, 4, 16, 16), generator=gen)
    den = ComposedDenoiser(video, mv, vcond, mcond, cfg, V, F_)
    with torch.no_grad():
        ref = edm_sample(den, noise, karras_sigmas(3), "euler", 1, "linear", gen)
    assert hashlib.sha256(got.numpy().tobytes()).hexdigest() == hashlib.sha256(ref.numpy().tobytes()).hexdigest()
    meta = json.loads((out / "matrix.json").read_text())
    assert meta["method"] == "diffusion2" and meta["ignored_knobs"] == ["sv4d_cfg_min", "sv4d_cfg_max"]  # SV4D's only


def test_static_puts_the_input_views_first_frame_everywhere_without_a_prior_call(tiny, tmp_path, monkeypatch):
    video, mv = tiny
    for prior in (video, mv):
        monkeypatch.setattr(prior, "denoise", lambda *a, **k: pytest.fail("static must not call a prior"))
    cond = _conditions(32)
    write_conditions(cond, tmp_path / "cond", store_dtype="float32")
    out = run_sampling(tmp_path / "cond", tmp_path / "m", _cfg(method="static"), tiny)
    from d2.utils.io import load_image

    expect = (cond.input * 255 + 0.5).floor() / 255  # the PNG's 8 bits
    for v in range(V):
        for f in range(F_):
            torch.testing.assert_close(load_image(out / f"view_{v:02d}" / f"frame_{f:02d}.png"), expect,
                                       atol=1e-6, rtol=0)
    assert not (out / "latents.pt").exists() and (out / "grid.png").is_file() and (out / "grid.mp4").is_file()
    meta = json.loads((out / "matrix.json").read_text())
    assert meta["method"] == "static" and meta["steps"] == [] and "num_steps" in meta["ignored_knobs"]
    # a video input whose orbit came from its last frame: the first frame is the video's
    late = Conditions(**{**cond.__dict__, "input": cond.video[-1].clone(), "input_frame_index": F_ - 1})
    _, images = method_matrix(tiny, late, _cfg(method="static"))
    assert images.shape == (V, F_, 3, 32, 32) and bool((images == cond.video[0]).all())


# every knob some method ignores, and another valid value of it
OTHER_VALUE = dict(weight_schedule="cosine", w_multiview_constant=0.3, s0=0.3, k=5.0, logistic_min=0.1,
                   logistic_max=0.9, step_fraction="i/N", per_view_video_weight=False, per_view_amplitude=0.4,
                   multiview_cfg="triangle", multiview_cfg_scale=4.0, multiview_cfg_min=1.5, multiview_cond_aug=0.05,
                   video_cfg_min=1.0, video_cfg_max=2.0, fps_id=6, motion_bucket_id=60, video_cond_aug=0.05,
                   num_steps=2, sigma_min=0.01, sigma_max=80.0, rho=5.0, solver="heun", rollback_steps=2,
                   rollback_noise="vp", seed=5, decode_chunk=2, devices=["cpu"], sv4d_cfg_min=1.2, sv4d_cfg_max=3.0)


@pytest.mark.parametrize("method", ["video_only", "multiview_only", "static"])
def test_the_knobs_a_method_ignores_do_not_change_its_matrix(tiny, method):
    cfg = _cfg(method=method, num_steps=2, rollback_steps=1, video_cond_aug=0.02, multiview_cond_aug=0.01)
    ignored = ignored_knobs(cfg)
    assert ignored and set(ignored) <= set(OTHER_VALUE)
    other = SamplingConfig(**{**cfg.model_dump(), **{k: OTHER_VALUE[k] for k in ignored}})
    cond = _conditions(32)
    a, b = method_matrix(tiny, cond, cfg), method_matrix(tiny, cond, other)
    assert torch.equal(a[1], b[1]) and (a[0] is None) == (b[0] is None)
    assert a[0] is None or torch.equal(a[0], b[0])
    # and a knob it reads does change it
    read = other.model_copy(update={"num_frames": F_ - 1} if method == "static" else {"seed": 99})
    moved = method_matrix(tiny, _conditions(32, f=F_ - 1) if method == "static" else cond, read)[1]
    assert moved.shape != a[1].shape or not torch.equal(moved, a[1])


# ---------------------------------------------------------------- Gaussian target


def _solver_gain(lam: float, sigmas: torch.Tensor, solver: str) -> float:
    """Std of the sampler's output per unit noise along an eigen-direction (variance lam) of a Gaussian target.

    For a Gaussian the probability-flow ODE is linear, dx/dsigma = a(sigma) (x - m) with
    a = sigma / (lam + sigma^2), so each Euler / Heun step multiplies (x - m) by a known factor.
    The exact ODE gives sqrt(lam); the difference is the solver's discretisation bias.
    """
    g = math.sqrt(1 + float(sigmas[0]) ** 2)
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        h, a0 = sn - s, s / (lam + s * s)
        if solver == "heun" and sn > 0:
            a1 = sn / (lam + sn * sn)
            g *= 1 + h / 2 * (a0 + a1 * (1 + h * a0))
        else:
            g *= 1 + h * a0
    return g


def _gauss_samples(cfg_g: GaussianPriorConfig, cfg: SamplingConfig, seeds: list[int]) -> torch.Tensor:
    video, mv = load_priors(PriorsConfig(backend="gaussian", gaussian=cfg_g))
    cond = _conditions(cfg_g.resolution, cfg.num_views, cfg.num_frames, gray=True)  # latent 0: mean = offset
    outs = [sample_matrix(video, mv, cond, cfg.model_copy(update={"seed": s})) for s in seeds]
    x = torch.stack(outs)  # [S, V, F, 3, r, r]: every (channel, pixel) is an independent sample
    return x.permute(0, 3, 4, 5, 1, 2).reshape(-1, cfg.num_views, cfg.num_frames).double()


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_gaussian_all_video_rows_have_the_target_mean_and_frame_covariance(solver):
    """Pinned to the video model, each row must be N(offset, C), rows independent, where C is the
    target std^2 R_F pushed through the solver: C = U diag(g(lam)^2) U^T (U, lam: eigen-pairs of
    std^2 R_F, g: :func:`_solver_gain`). We also bound the solver bias against the continuous
    target: 50 deterministic Euler steps shrink the std by 7-9 % (a property of the authors'
    solver, not of this code), Heun by under 2 %.

    Tolerance: n = 2 seeds x 3 channels x 16^2 pixels x 4 rows = 6144 sample rows. The standard
    error of a covariance entry is <= std^2 sqrt((1 + rho^2) / n) ~= 0.0041 and of the mean
    std / sqrt(n) ~= 0.0064; we allow 5 standard errors (false failure rate ~1e-6 per entry),
    far below the effect of a wrong sampler (e.g. a 1 % error in c_skip changes C by > 0.05).
    """
    std, rho, off = 0.5, 0.8, 0.3
    g = GaussianPriorConfig(resolution=16, std=std, video_rho=rho, video_offset=off, multiview_offset=-1.0)
    cfg = SamplingConfig(num_views=4, num_frames=5, resolution=16, num_steps=50, rollback_steps=0, solver=solver,
                         weight_schedule="constant", w_multiview_constant=0.0, per_view_video_weight=False,
                         video_cond_aug=0.0, multiview_cond_aug=0.0, progress=False)
    sigmas = karras_sigmas(50, 0.002, 700.0, 7.0)
    target = torch.tensor([[std**2 * rho ** abs(i - j) for j in range(5)] for i in range(5)], dtype=torch.float64)
    lam, u = torch.linalg.eigh(target)
    gains = torch.tensor([_solver_gain(float(lk), sigmas, solver) for lk in lam], dtype=torch.float64)
    bias = (gains / lam.sqrt() - 1).abs().max().item()
    assert bias < (0.1 if solver == "euler" else 0.02)
    expect_cov = u @ torch.diag(gains**2) @ u.T
    x = _gauss_samples(g, cfg, [1, 2])  # [n', V, F]
    rows = x.reshape(-1, 5)  # every row of every matrix
    n = rows.shape[0]
    assert n == 6144
    emp = torch.cov(rows.T)
    tol_cov = 5 * std**2 * math.sqrt((1 + rho**2) / n)
    assert (emp - expect_cov).abs().max() < tol_cov, (emp, expect_cov)
    assert (rows.mean(0) - off).abs().max() < 5 * std / math.sqrt(n)
    # rows of one matrix are independent (the video model couples frames only)
    cross = ((x[:, 0] - off).T @ (x[:, 1] - off)) / x.shape[0]  # [F, F]
    assert cross.abs().max() < 5 * std**2 / math.sqrt(x.shape[0])


def test_gaussian_blend_has_the_per_view_weighted_mean():
    """rho = 0 for both families: the blend of the two scores is exactly the score of
    N(w_video[v] m_video + w_multiview[v] m_multiview, std^2) (same variance), so each view's
    mean is the weighted mean and its variance std^2 (times the Euler gain, as above).
    n = 2 x 768 x 5 frames = 7680 samples per view: 5 standard errors = 0.029 (mean) and
    5 var sqrt(2/n) <= 0.020 (variance).
    """
    std = 0.5
    g = GaussianPriorConfig(resolution=16, std=std, video_rho=0.0, multiview_rho=0.0, video_offset=1.0,
                            multiview_offset=-1.0)
    cfg = SamplingConfig(num_views=7, num_frames=5, resolution=16, num_steps=50, rollback_steps=0,
                         weight_schedule="constant", w_multiview_constant=0.4, per_view_video_weight=True,
                         video_cond_aug=0.0, multiview_cond_aug=0.0, progress=False)
    x = _gauss_samples(g, cfg, [3, 4])  # [n', V, F]
    w_video, w_mv = weights_at(0, cfg, 7)
    per_view = x.permute(1, 0, 2).reshape(7, -1)  # [V, n]
    n = per_view.shape[1]
    expect = w_video.double() * 1.0 + w_mv.double() * -1.0
    assert len(set(round(e, 4) for e in expect.tolist())) >= 3  # the profile really varies over views
    assert (per_view.mean(1) - expect).abs().max() < 5 * std / math.sqrt(n)
    var = _solver_gain(std**2, karras_sigmas(50), "euler") ** 2
    assert (per_view.var(1) - var).abs().max() < 5 * var * math.sqrt(2 / n)


# ---------------------------------------------------------------- chunks, seeds, stage


def test_chunk_size_does_not_change_the_result(tiny):
    video, mv = tiny
    cond = _conditions(32)
    base = dict(rollback_steps=1, num_steps=2, video_cond_aug=0.02, multiview_cond_aug=0.01,
                weight_schedule="logistic")
    a = sample_matrix(video, mv, cond, _cfg(chunk_size=1, **base))
    b = sample_matrix(video, mv, cond, _cfg(chunk_size=3, **base))
    # equal up to float32 batch-size effects in the CPU kernels (~1e-4 after sigma_max = 700);
    # a wrong slice of x or of the conditioning changes entries by O(0.1)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    assert a.abs().max() > 0.1


@pytest.mark.parametrize("devices,v,f", [(2, 3, 5), (3, 5, 4)])
def test_a_matrix_spread_over_devices_equals_one_device(tiny, devices, v, f):
    """V and F not divisible by the device count; each replica is its own copy of the priors."""
    import copy

    video, mv = tiny
    cond = _conditions(32, v=v, f=f)
    cfg = _cfg(num_views=v, num_frames=f, chunk_size=1, rollback_steps=1, num_steps=2, video_cond_aug=0.02,
               weight_schedule="logistic")
    one = sample_matrix(video, mv, cond, cfg)
    replicas = [(video, mv)] + [(copy.deepcopy(video), copy.deepcopy(mv)) for _ in range(devices - 1)]
    seen: list = []
    spread = sample_matrix(video, mv, cond, cfg, replicas=replicas,
                           denoiser_hook=lambda den: seen.append(den.replicas is not None))
    assert seen == [True]
    torch.testing.assert_close(spread, one, atol=1e-5, rtol=0)
    assert one.abs().max() > 0.1


def test_same_seed_same_matrix(tiny):
    video, mv = tiny
    cond = _conditions(32)
    a = sample_matrix(video, mv, cond, _cfg(seed=7, rollback_steps=1, num_steps=2, video_cond_aug=0.02))
    b = sample_matrix(video, mv, cond, _cfg(seed=7, rollback_steps=1, num_steps=2, video_cond_aug=0.02))
    c = sample_matrix(video, mv, cond, _cfg(seed=8, rollback_steps=1, num_steps=2, video_cond_aug=0.02))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_run_sampling_writes_the_matrix_folder(tiny, tmp_path):
    cond = _conditions(32)
    write_conditions(cond, tmp_path / "cond")
    cfg = _cfg(num_steps=2, solver="heun")
    out = run_sampling(tmp_path / "cond", tmp_path / "matrix", cfg, tiny)
    assert (out / "latents.pt").is_file() and (out / "grid.png").is_file() and (out / "grid.mp4").is_file()
    for v in range(V):
        for f in range(F_):
            assert (out / f"view_{v:02d}" / f"frame_{f:02d}.png").is_file()
    assert (out / "references" / "orbit_view_02.png").is_file() and (out / "references" / "video_frame_03.png").is_file()
    meta = json.loads((out / "matrix.json").read_text())
    assert (meta["V"], meta["F"], meta["resolution"], meta["input_view_index"]) == (V, F_, 32, V - 1)
    assert meta["azimuths_deg"] == orbit_azimuths(V) and meta["times"] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert meta["fov_deg"] == 33.8 and meta["radius"] == 2.0 and meta["elevation_deg"] == 10.0
    lat = torch.load(out / "latents.pt", weights_only=True)["latents"]
    assert lat.shape == (V, F_, 4, 16, 16)
    with pytest.raises(ValueError, match="views"):
        run_sampling(tmp_path / "cond", tmp_path / "bad", _cfg(num_views=5), tiny)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("mode", ["linear", "vp"])
def test_rollback_takes_the_first_steps_twice_with_renoising(mode):
    from d2.stages.sampling import edm_sample

    calls = []

    def denoiser(x, sigma, i):  # D = 0.5 x: any linear denoiser will do
        calls.append((i, sigma))
        return 0.5 * x

    sigmas = karras_sigmas(5)
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    out = edm_sample(denoiser, noise, sigmas, rollback_steps=2, rollback_noise=mode,
                     generator=torch.Generator().manual_seed(9))
    assert [c[0] for c in calls] == [0, 0, 1, 1, 2, 3, 4]  # steps 0 and 1 are taken twice from the same sigma
    gen = torch.Generator().manual_seed(9)
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)
    for i in range(5):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        for j in range(2 if i < 2 else 1):
            x_next = x + (sn - s) * (x - 0.5 * x) / s
            if j == 0 and i < 2:
                std = (s - sn) if mode == "linear" else math.sqrt(s * s - sn * sn)
                x = x_next + std * torch.randn(x.shape, generator=gen)
            else:
                x = x_next
    torch.testing.assert_close(out, x)


def test_grid_thumbnails_enlarge_small_matrices_by_whole_factors():
    from d2.stages.sampling import _thumbs

    x = torch.rand(2, 3, 3, 16, 16)
    y = _thumbs(x, 32)  # a 16 px matrix is shown at 32 px, each pixel a 2 x 2 block
    assert y.shape == (2, 3, 3, 32, 32) and torch.equal(y[..., ::2, ::2], x) and torch.equal(y[..., 1::2, 1::2], x)
    assert _thumbs(torch.rand(1, 3, 64, 64), 32).shape == (1, 3, 32, 32)  # larger: shrunk
    assert _thumbs(torch.rand(1, 3, 20, 20), 32).shape == (1, 3, 20, 20)  # no whole factor fits
