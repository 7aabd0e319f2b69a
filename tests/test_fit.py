"""Fitting 4D Gaussians: recovery of a known scene, losses, densification, checkpoints, bad input."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

import d2.stages.fit as fit_mod
from d2.eval.metrics import ssim
from d2.stages.cameras import OrbitSpec, frame_times, orbit_azimuths
from d2.stages.export import load_gaussians, render_views
from d2.stages.fit import (
    DensifyStats,
    FitConfig,
    active_degrees,
    densify_and_prune,
    fit_loss,
    load_matrix,
    make_optimizer,
    reset_opacity,
    run_fit,
    ssim_same,
    write_matrix,
)
from d2.stages.gaussians import init_random, procedural_gaussians, rotation_4d


def _make_matrix(path: Path, v: int, f: int, size: int, n: int = 48) -> tuple:
    g = procedural_gaussians(n, seed=0)
    spec = OrbitSpec()
    az, tt = orbit_azimuths(v), frame_times(f)
    imgs = render_views(g, [a for a in az for _ in tt], [t for _ in az for t in tt], spec, size, backend="torch")
    write_matrix(path, imgs.reshape(v, f, 3, size, size), az, tt, spec)
    return g, spec, az


def _small_cfg(**kw) -> FitConfig:
    base = dict(lambda_lpips=0.0, lambda_ssim=1.0, lambda_l1=1.0, progress=False, turntable_frames=0,
                export_ply=False, checkpoint_every=0, num_gaussians=60, batch_size=2, densify_from=2,
                densify_every=2, sh_degree=1, sh_increase_every=0, opacity_reset_every=0,
                opacity_reset_at_densify_from=False, lr_means=1.6e-3)
    base.update(kw)
    return FitConfig(**base)


@pytest.mark.slow
def test_fit_recovers_held_out_views_and_times(tmp_path: Path) -> None:
    """64x64, 8 views x 6 frames of 48 known 4D Gaussians (16 moving); fit 500 -> ~1000 Gaussians
    (4DGS densification at 100 and 150), 200 iterations of 4 images, SSIM + L1 (no LPIPS
    weights here). Held out: 8 azimuths halfway between the training views x 5 times between
    the frames. Measured: 32.2 dB, 44 s on one thread of a loaded 2-core machine."""
    gt, spec, az = _make_matrix(tmp_path / "matrix", 8, 6, 64)
    cfg = _small_cfg(iterations=200, num_gaussians=500, batch_size=4, densify_from=50, densify_every=50,
                     densify_until=150, max_gaussians=1500, turntable_frames=4, export_ply=True)
    t0 = time.perf_counter()
    summary = run_fit(tmp_path / "matrix", tmp_path / "fit", cfg)
    took = time.perf_counter() - t0
    g, orbit = load_gaussians(tmp_path / "fit" / "gaussians.safetensors")
    held_az = [a + 22.5 for a in az]
    held_t = [0.1, 0.3, 0.5, 0.7, 0.9]
    pa = [a for a in held_az for _ in held_t]
    pt = [t for _ in held_az for t in held_t]
    ref = render_views(gt, pa, pt, spec, 64, backend="torch")
    pred = render_views(g, pa, pt, spec, 64, backend="torch")
    psnr = -10 * math.log10(float(((ref - pred) ** 2).mean()))
    print(f"held-out PSNR {psnr:.2f} dB, train PSNR {summary['train_psnr']:.2f} dB, "
          f"{summary['num_gaussians']} Gaussians, {cfg.iterations} iterations, {took:.1f} s")
    assert psnr >= 25.0
    assert (ref - 1).abs().mean() > 0.05  # the held-out views do show the object
    assert orbit["radius"] == spec.radius and summary["num_gaussians"] == g.num
    assert len(list((tmp_path / "fit" / "ply").glob("t_*.ply"))) == 6
    assert (tmp_path / "fit" / "turntable.mp4").stat().st_size > 0
    assert not (tmp_path / "fit" / "checkpoint.pt").exists()


def test_confidences_are_detached() -> None:
    torch.manual_seed(1)
    target = torch.rand(2, 3, 16, 16)
    render = (target + 0.2 * torch.randn_like(target)).clamp(0, 1).requires_grad_(True)
    cfg = FitConfig(lambda_lpips=0.0, lambda_ssim=0.7, ssim_padding="valid")
    loss, logs = fit_loss(render, target, cfg, None)
    loss.backward()
    s = ssim(render.detach(), target)
    # d/dx mean(C (1 - ssim(x))) with C = ssim(x) held fixed
    x = render.detach().clone().requires_grad_(True)
    (0.7 * (s * (1 - ssim(x, target))).mean()).backward()
    torch.testing.assert_close(render.grad, x.grad)
    # and it differs from the gradient with the confidence left attached
    y = render.detach().clone().requires_grad_(True)
    sy = ssim(y, target)
    (0.7 * (sy * (1 - sy)).mean()).backward()
    assert (y.grad - x.grad).abs().max() > 1e-4
    assert float(logs["loss"]) == pytest.approx(float(0.7 * (s * (1 - s)).mean()), rel=1e-5)


def test_missing_lpips_weights_stop_a_run_that_requires_them(tmp_path: Path) -> None:
    _make_matrix(tmp_path / "matrix", 2, 2, 16, n=8)
    cfg = _small_cfg(lambda_lpips=1.0, lpips_vgg_weights=tmp_path / "nope" / "vgg16.pth", iterations=1,
                     lpips_required=True)
    with pytest.raises(RuntimeError, match=r"lpips_required"):
        run_fit(tmp_path / "matrix", tmp_path / "fit", cfg)
    assert not (tmp_path / "fit").exists()  # stopped before any work
    # not required: the fit runs without LPIPS and says what it optimised instead
    summary = run_fit(tmp_path / "matrix", tmp_path / "fit", cfg.model_copy(update={"lpips_required": False}))
    written = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert written["lpips_in_loss"] is False and "LPIPS weights unavailable" in written["lpips_left_out_because"]
    assert written["objective"] == "1 * C_ssim * (1 - SSIM[same]) + 1 * L1" == summary["objective"]


def test_loss_ssim_gives_border_pixels_gradient() -> None:
    """Same-padded SSIM (the 3DGS loss) reaches every pixel; valid windows leave a 5 px border flat."""
    torch.manual_seed(2)
    target = torch.rand(1, 3, 24, 24)
    x = (target + 0.1 * torch.randn_like(target)).clamp(0, 1).requires_grad_(True)
    (1 - ssim_same(x, target)).sum().backward()
    assert (x.grad[..., 0, :].abs().amin() > 0) and (x.grad[..., :, -1].abs().amin() > 0)
    y = x.detach().clone().requires_grad_(True)
    (1 - ssim(y, target)).sum().backward()
    assert y.grad[..., 0, :].abs().max() < 1e-3 * y.grad.abs().max()
    # identical images: SSIM 1 with zero padding too
    torch.testing.assert_close(ssim_same(target, target), torch.ones(1))


def test_bad_matrix_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="matrix.json"):
        load_matrix(tmp_path)
    _make_matrix(tmp_path / "m", 2, 2, 16, n=8)
    (tmp_path / "m" / "view_01" / "frame_00.png").unlink()
    with pytest.raises(FileNotFoundError, match="view_01/frame_00.png"):
        run_fit(tmp_path / "m", tmp_path / "fit", _small_cfg(iterations=1))


def test_screen_space_statistics_average_over_the_views_that_saw_each_gaussian() -> None:
    """4DGS: per iteration, the norm of each view's own NDC-space gradient (the batch loss holds
    1/V of it; NDC = 2 pixel / size), averaged over the views where the Gaussian was visible."""
    st = DensifyStats(3, torch.device("cpu"))
    w, h, v = 40, 20, 2
    grad = torch.tensor([[[1e-5, 0.0], [3e-5, 4e-5], [0.0, 0.0]],
                         [[0.0, 2e-5], [9.0, 9.0], [0.0, 0.0]]])  # [V, N, 2] pixels
    visible = torch.tensor([[True, True, False], [True, False, False]])
    radii = torch.tensor([[3.0, 5.0, 0.0], [7.0, 50.0, 0.0]])
    st.add(grad, visible, radii, w, h)
    g0 = [math.hypot(1e-5 * v * w / 2, 0.0), math.hypot(0.0, 2e-5 * v * h / 2)]
    g1 = math.hypot(3e-5 * v * w / 2, 4e-5 * v * h / 2)  # view 2 did not see it: its 9.0 is ignored
    torch.testing.assert_close(st.mean_grad(), torch.tensor([sum(g0) / 2, g1, 0.0]))
    torch.testing.assert_close(st.count, torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(st.max_radii, torch.tensor([7.0, 5.0, 0.0]))


def test_densification_decision_and_split_children_follow_4dgs() -> None:
    """Golden values from the 4DGS rules, re-derived here: clone when grad >= 2e-4 and the largest
    spatial scale <= 0.01 x extent, split when larger (2 children sampled from the 4D Gaussian,
    all four scales / (0.8 x 2)), prune opacity < 0.005; Adam moments of new rows start at 0."""
    extent = 2.2
    g = init_random(8, sh_degree=1, time_basis=2, generator=torch.Generator().manual_seed(0))
    small, large = math.log(0.5 * 0.01 * extent), math.log(3 * 0.01 * extent)
    opac = [0.5, 0.5, 0.5, 0.5, 0.003, 0.5, 0.5, 0.5]
    grads = [3e-4, 1e-4, 3e-4, 2e-4, 5e-4, 0.0, 1.99e-4, 9e-4]
    spatial = [small, small, large, large, small, large, large, small]
    with torch.no_grad():
        g.log_scales[:, :3] = torch.tensor(spatial)[:, None]
        g.log_scales[:, 0] -= 0.3  # the largest axis decides: axes 1 and 2 carry the value above
        g.log_scales[:, 3] = math.log(0.4)
        g.opacity_logits.copy_(torch.logit(torch.tensor(opac)))
        g.quats_l.copy_(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)))
        g.quats_r.copy_(torch.randn(8, 4, generator=torch.Generator().manual_seed(2)))
    cfg = _small_cfg(max_gaussians=1000)
    opt = make_optimizer(g, cfg, extent)
    (g.means.sum() + g.opacity_logits.sum() + g.log_scales.sum()).backward()
    opt.step()
    before = {k: getattr(g, k).detach().clone() for k in ("means", "log_scales", "quats_l", "quats_r",
                                                          "opacity_logits", "sh_dc")}
    stats = DensifyStats(8, torch.device("cpu"))
    stats.grad_accum = torch.tensor(grads) * 4
    stats.count = torch.full((8,), 4.0)
    # expected, from the rules
    big = [math.exp(x) > 0.01 * extent for x in spatial]
    chosen = [x >= 2e-4 for x in grads]
    clones = [i for i in range(8) if chosen[i] and not big[i]]
    splits = [i for i in range(8) if chosen[i] and big[i]]
    assert clones == [0, 4, 7] and splits == [2, 3]
    kept = [i for i in range(8) if i not in splits]
    rows = kept + clones + splits + splits  # our order: kept, clones, first children, second children
    pruned = [r for r, i in enumerate(rows) if opac[i] < 0.005]  # Gaussian 4 and its clone
    gen = torch.Generator().manual_seed(7)
    rec = densify_and_prune(g, opt, stats, cfg, extent, torch.Generator().manual_seed(7))
    assert rec == {"cloned": 3, "split": 2, "pruned": len(pruned), "num": len(rows) - len(pruned)}
    live = [r for r in range(len(rows)) if r not in pruned]
    src = [rows[r] for r in live]
    assert g.num == len(src)
    n_kept = len([i for i in kept if opac[i] >= 0.005])
    n_clone = len([i for i in clones if opac[i] >= 0.005])
    # kept rows and clones: exact copies
    for j in range(n_kept + n_clone):
        for k, v in before.items():
            torch.testing.assert_close(getattr(g, k)[j], v[src[j]])
    # children: mu + R diag(s) z, every scale (temporal too) divided by 1.6
    z = [torch.randn(2, 4, 1, generator=gen, dtype=torch.float64) for _ in range(2)]
    for c in range(2):
        for m, i in enumerate(splits):
            row = n_kept + n_clone + 2 * c + m
            torch.testing.assert_close(g.log_scales[row], before["log_scales"][i] - math.log(0.8 * 2))
            Rm = rotation_4d(before["quats_l"][i], before["quats_r"][i])
            expect = before["means"][i] + (Rm * torch.exp(before["log_scales"][i])) @ z[c][m, :, 0].float()
            torch.testing.assert_close(g.means[row], expect)
            torch.testing.assert_close(g.opacity_logits[row], before["opacity_logits"][i])
    for group in opt.param_groups:
        p = group["params"][0]
        assert p is getattr(g, group["name"]) and p.shape[0] == g.num
        st = opt.state[p]
        if group["name"] in ("means", "opacity_logits"):
            assert st["exp_avg"][n_kept:].abs().sum() == 0  # clones and children restart their moments
            assert (st["exp_avg"][:n_kept].abs().sum(-1) > 0).all() if st["exp_avg"].dim() > 1 else True
    ((g.means ** 2).sum() + g.sh_dc.sum()).backward()
    opt.step()  # another step runs with the remapped state


def _size_prune_case(cfg: FitConfig, extent: float, densify: bool = True) -> dict[str, int]:
    """Four Gaussians: 1 too large in world space, 2 too large on screen (21 px > 20), 3 at 20 px."""
    g = init_random(4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        g.log_scales[:, :3] = math.log(0.05)
        g.log_scales[1, 2] = math.log(0.1 * extent * 1.01)
        g.opacity_logits.fill_(2.0)
    opt = make_optimizer(g, cfg, extent)
    stats = DensifyStats(4, torch.device("cpu"))
    stats.max_radii = torch.tensor([3.0, 3.0, 21.0, 20.0])
    assert densify_and_prune(g, opt, stats, cfg, extent, torch.Generator(), densify=densify)["pruned"] == 0
    return densify_and_prune(g, opt, stats, cfg, extent, torch.Generator(), densify=densify, size_prune=True)


def test_size_pruning_opacity_reset_and_band_schedule() -> None:
    """4DGS's densification_postfix zeroes max_radii2D before densify_and_prune prunes: only the
    world-size rule acts after densifying; the screen-size rule acts with screen_size_prune_fires,
    or when a step only prunes (4DGS's prune_only keeps the radii)."""
    extent = 2.0
    assert _size_prune_case(_small_cfg(), extent)["pruned"] == 1  # 4DGS: the 21 px Gaussian stays
    assert _size_prune_case(_small_cfg(screen_size_prune_fires=True), extent)["pruned"] == 2
    assert _size_prune_case(_small_cfg(), extent, densify=False)["pruned"] == 2
    g = init_random(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        g.opacity_logits.fill_(2.0)
    opt = make_optimizer(g, _small_cfg(), extent)
    g.opacity_logits.sum().backward()
    reset_opacity(g, opt, 0.01)
    torch.testing.assert_close(torch.sigmoid(g.opacity_logits.detach()), torch.full((2,), 0.01))
    assert g.opacity_logits.grad is None  # as 4DGS's fresh tensor: no opacity step on the reset's iteration
    c = FitConfig(sh_degree=3, time_basis=2, sh_increase_every=1000)
    assert [active_degrees(c, s) for s in (0, 999, 1000, 3000, 4000, 5000, 9000)] == [
        (0, 0), (0, 0), (1, 0), (3, 0), (3, 1), (3, 2), (3, 2)]


def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    _make_matrix(tmp_path / "matrix", 3, 2, 16, n=10)
    cfg = _small_cfg(iterations=6, checkpoint_every=2)
    run_fit(tmp_path / "matrix", tmp_path / "full", cfg)

    calls = {"n": 0}
    real = fit_mod.fit_loss

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # during iteration 4, after the checkpoint of iteration 2
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(fit_mod, "fit_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_fit(tmp_path / "matrix", tmp_path / "resumed", cfg)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "resumed" / "gaussians.safetensors").exists()
    monkeypatch.setattr(fit_mod, "fit_loss", real)
    summary = run_fit(tmp_path / "matrix", tmp_path / "resumed", cfg)
    assert summary["resumed_from"] == 2
    a, _ = load_gaussians(tmp_path / "full" / "gaussians.safetensors")
    b, _ = load_gaussians(tmp_path / "resumed" / "gaussians.safetensors")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v)
    full = json.loads((tmp_path / "full" / "fit.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "fit.json").read_text())
    assert resumed["iterations"] == 6
    # the curve and the densification record cover the whole run, iterations before the checkpoint too
    assert [c["iteration"] for c in resumed["curve"]] == [1, 2, 3, 4, 5, 6]
    assert resumed["curve"] == full["curve"] and resumed["densification"] == full["densification"]


def test_missing_video_writer_fails_before_fitting(tmp_path: Path, monkeypatch) -> None:
    """turntable.mp4 is written last: without an MP4 writer the fit stops before any work."""
    _make_matrix(tmp_path / "matrix", 2, 2, 16)

    def no_writer() -> str:
        raise RuntimeError("writing MP4 needs imageio-ffmpeg (a project dependency) or PyAV")

    calls = []
    monkeypatch.setattr(fit_mod, "video_plugin", no_writer)
    monkeypatch.setattr(fit_mod, "load_matrix", lambda *a, **k: calls.append(1))
    with pytest.raises(RuntimeError, match="turntable_frames=0"):
        run_fit(tmp_path / "matrix", tmp_path / "fit", _small_cfg(iterations=2, turntable_frames=4))
    assert not calls and not (tmp_path / "fit").exists()
    monkeypatch.undo()
    run_fit(tmp_path / "matrix", tmp_path / "fit0", _small_cfg(iterations=2, turntable_frames=0))  # the way out
    assert (tmp_path / "fit0" / "fit.json").is_file()


def test_rasterizer_reports_screen_space_means_and_visibility() -> None:
    """The statistics densification reads: 2D means whose gradient is kept, radii, visibility."""
    from d2.stages.cameras import orbit_cameras
    from d2.stages.render import rasterize

    vm, K = orbit_cameras([0.0], OrbitSpec(), 24, 24)
    means = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 3.0, 0.0], [4.0, 0.0, 0.0]]])  # centre, off-screen, behind
    covars = (torch.eye(3) * 0.05 ** 2).expand(1, 3, 3, 3).clone()
    opac = torch.full((1, 3), 0.8, requires_grad=True)
    means.requires_grad_(True)
    info: dict = {}
    col, _ = rasterize(means, covars, opac, torch.rand(1, 3, 3), vm[None], K[None], 24, 24,
                       background=torch.ones(3), backend="torch", info=info)
    assert info["visible"].tolist() == [[[True, False, False]]]
    assert info["means2d"].shape == (1, 1, 3, 2) and info["radii"][0, 0, 0] > 0 and info["radii"][0, 0, 1] == 0
    ((col - 0.3) ** 2).sum().backward()
    g2 = info["means2d"].grad
    assert g2 is not None and g2[0, 0, 0].abs().sum() > 0 and g2[0, 0, 1:].abs().sum() == 0


def test_lpips_is_in_the_loss_whenever_its_weights_load(tmp_path: Path, monkeypatch) -> None:
    """Found weights (here a random VGG backbone stands in for them): LPIPS joins the loss."""
    import d2.eval.perceptual as metrics

    real = metrics.build_lpips
    monkeypatch.setattr(metrics, "build_lpips", lambda *a, **k: real(random_backbone=True, device="cpu"))
    _make_matrix(tmp_path / "matrix", 2, 2, 16, n=8)
    summary = run_fit(tmp_path / "matrix", tmp_path / "fit", _small_cfg(iterations=1, lambda_lpips=0.5))
    assert summary["lpips_in_loss"] is True and summary["lpips_left_out_because"] is None
    assert summary["objective"].startswith("0.5 * C_lpips * LPIPS + ") and "lpips" in summary["final"]


def test_time_component_of_the_means_keeps_its_own_constant_rate() -> None:
    """4DGS: spatial means decay from lr_means x extent; the time component stays at its rate."""
    from d2.stages.fit import _lr_means, _rescale_time_step

    extent = 2.0
    cfg = _small_cfg(lr_means=1e-3, lr_means_final=0.01, lr_means_max_steps=100, lr_time=4e-3)
    assert _lr_means(cfg, extent, 0) == pytest.approx(2e-3)
    assert _lr_means(cfg, extent, 50) == pytest.approx(2e-3 * 0.1)
    assert _lr_means(cfg, extent, 500) == pytest.approx(2e-3 * 0.01)
    g = init_random(5, generator=torch.Generator().manual_seed(0))
    opt = make_optimizer(g, cfg, extent)
    for group in opt.param_groups:
        if group["name"] == "means":
            group["lr"] = _lr_means(cfg, extent, 50)
    before = g.means.detach().clone()
    g.means.sum().backward()  # Adam's first step moves every element by exactly its rate
    t_before = g.means[:, 3].detach().clone()
    opt.step()
    _rescale_time_step(g, t_before, _lr_means(cfg, extent, 50), 4e-3 * extent)
    step = (before - g.means.detach()).abs()
    torch.testing.assert_close(step[:, :3], torch.full((5, 3), 2e-4), rtol=0, atol=2e-7)
    torch.testing.assert_close(step[:, 3], torch.full((5,), 8e-3), rtol=0, atol=2e-6)  # float32 rounding


def test_densification_comes_before_the_optimiser_step(tmp_path: Path) -> None:
    """4DGS densifies before optimizer.step(): the densified tensors are new and carry no
    gradient, so that iteration's step changes nothing. Here densification at iteration 2
    copies every Gaussian unchanged (no clone, split or prune), so after 2 iterations the
    Gaussians are those after 1; stepping first (densify_before_step=false) moves them."""
    _make_matrix(tmp_path / "matrix", 3, 2, 16, n=10)
    cfg = _small_cfg(iterations=1, densify_from=1, densify_every=2, densify_grad_threshold=1e9, prune_opacity=0.0)
    run_fit(tmp_path / "matrix", tmp_path / "one", cfg)
    g1, _ = load_gaussians(tmp_path / "one" / "gaussians.safetensors")
    two = {}
    for before in (True, False):
        out = tmp_path / f"two_{before}"
        summary = run_fit(tmp_path / "matrix", out, cfg.model_copy(update={"iterations": 2,
                                                                           "densify_before_step": before}))
        assert [d["iteration"] for d in summary["densification"]] == [2] and summary["num_gaussians"] == g1.num
        two[before], _ = load_gaussians(out / "gaussians.safetensors")
    for k, v in g1.state_dict().items():
        torch.testing.assert_close(two[True].state_dict()[k], v, rtol=0, atol=0)
    assert (two[False].means - g1.means).abs().max() > 1e-6


def _targets_seen(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = fit_mod.fit_loss

    def recording(render, target, *a, **k):
        seen.append(target.detach().clone())
        return real(render, target, *a, **k)

    monkeypatch.setattr(fit_mod, "fit_loss", recording)
    return seen


def test_excluded_views_never_reach_the_loss(tmp_path: Path, monkeypatch) -> None:
    """fit.exclude_views: those views are not sampled, not carved for the initialisation and not in
    the training PSNR; fit.json names them and scores them apart."""
    _make_matrix(tmp_path / "matrix", 4, 2, 16, n=10)
    images = load_matrix(tmp_path / "matrix").images  # [V, F, 3, H, W]
    carved = []
    real_init = fit_mod.init_from_images
    monkeypatch.setattr(fit_mod, "init_from_images", lambda im, *a, **k: carved.append(im.shape[0]) or
                        real_init(im, *a, **k))
    seen = _targets_seen(monkeypatch)
    summary = run_fit(tmp_path / "matrix", tmp_path / "fit", _small_cfg(iterations=12, batch_size=4,
                                                                         exclude_views=[2, 1]))
    assert carved == [2]
    targets = torch.cat(seen)  # [12 x 4, 3, H, W]
    assert targets.shape[0] == 48

    def views_of(t: torch.Tensor) -> set[int]:
        return {v for v in range(4) for f in range(2) if torch.equal(images[v, f], t)}

    hit = [views_of(t) for t in targets]
    assert all(h and h <= {0, 3} for h in hit)  # every target is an image of a kept view
    assert {v for h in hit for v in h} == {0, 3}
    assert summary["fitted_views"] == [0, 3] and summary["excluded_views"] == [1, 2]
    assert isinstance(summary["excluded_views_psnr"], float)
    assert summary["excluded_views_psnr"] != summary["train_psnr"]
    # without exclusions every view is sampled
    seen.clear()
    full = run_fit(tmp_path / "matrix", tmp_path / "all", _small_cfg(iterations=12, batch_size=4))
    assert {v for t in torch.cat(seen) for v in views_of(t)} == {0, 1, 2, 3}
    assert full["excluded_views_psnr"] is None and full["fitted_views"] == [0, 1, 2, 3]


def test_bad_view_exclusions_fail_before_any_work(tmp_path: Path, monkeypatch) -> None:
    from d2.config import ParamsError, load_params

    _make_matrix(tmp_path / "matrix", 3, 2, 16, n=8)
    calls = []
    monkeypatch.setattr(fit_mod, "load_matrix", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"view\(s\) \[3\] are not in the matrix of 3 views"):
        run_fit(tmp_path / "matrix", tmp_path / "fit", _small_cfg(iterations=1, exclude_views=[3]))
    with pytest.raises(ValueError, match="leaves none of the 3 views"):
        run_fit(tmp_path / "matrix", tmp_path / "fit", _small_cfg(iterations=1, exclude_views=[0, 1, 2]))
    assert not calls and not (tmp_path / "fit").exists()
    with pytest.raises(ValueError, match="distinct view indices >= 0"):
        _small_cfg(exclude_views=[-1])
    with pytest.raises(ValueError, match="distinct view indices >= 0"):
        _small_cfg(exclude_views=[1, 1])
    # a run's params are checked against the orbit it samples, before any stage runs
    with pytest.raises(ParamsError, match=r"view\(s\) \[8\] are not in the matrix of 8 views"):
        load_params(None, ["fit.exclude_views=[8]"])
    assert load_params(None, ["fit.exclude_views=[7, 0]"]).fit.exclude_views == [0, 7]


def test_densify_strategy_takes_its_rules_from_the_fit_config() -> None:
    """Every rule of the strategy is the FitConfig field of the same name (non-default values)."""
    from dataclasses import fields

    cfg = _small_cfg(densify_from=7, densify_until=70, densify_every=3, densify_grad_threshold=1e-3,
                     dense_fraction=0.02, split_scale_divisor=2.0, max_gaussians=99, densify_before_step=not FitConfig().densify_before_step,
                     opacity_reset_every=11, opacity_reset_value=0.02, opacity_reset_at_densify_from=not FitConfig().opacity_reset_at_densify_from,
                     prune_opacity=0.01, prune_screen_size=5.0, screen_size_prune_fires=True, prune_world_size=0.2)
    gen = torch.Generator()
    strategy = fit_mod.DensifyStrategy.from_config(cfg, 3.0, gen)
    assert strategy.extent == 3.0 and strategy.generator is gen
    rules = [f.name for f in fields(strategy) if f.name not in ("extent", "generator")]
    assert len(rules) == 15
    for name in rules:
        assert getattr(strategy, name) == getattr(cfg, name) != getattr(FitConfig(), name), name
