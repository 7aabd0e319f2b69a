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
from d2.stages.fit import FitConfig, densify_and_prune, fit_loss, load_matrix, make_optimizer, run_fit, write_matrix
from d2.stages.gaussians import init_random, procedural_gaussians


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
                densify_every=2)
    base.update(kw)
    return FitConfig(**base)


@pytest.mark.slow
def test_fit_recovers_held_out_views_and_times(tmp_path: Path) -> None:
    """64x64, 8 views x 6 frames of 48 known 4D Gaussians (16 moving); fit 500 -> ~550 Gaussians,
    200 iterations of 4 images, SSIM + L1 (no LPIPS weights here). Held out: 8 azimuths halfway
    between the training views x 5 times between the frames. Measured: 31.4 dB, 83 s on one
    thread of a loaded 2-core machine."""
    gt, spec, az = _make_matrix(tmp_path / "matrix", 8, 6, 64)
    cfg = _small_cfg(iterations=200, num_gaussians=500, batch_size=4, densify_from=50, densify_every=50,
                     turntable_frames=4, export_ply=True)
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
    cfg = FitConfig(lambda_lpips=0.0, lambda_ssim=0.7)
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


def test_missing_lpips_weights_stop_the_run(tmp_path: Path) -> None:
    _make_matrix(tmp_path / "matrix", 2, 2, 16, n=8)
    cfg = _small_cfg(lambda_lpips=1.0, lpips_vgg_weights=tmp_path / "nope" / "vgg16.pth", iterations=1)
    with pytest.raises(RuntimeError, match=r"lambda_lpips=0"):
        run_fit(tmp_path / "matrix", tmp_path / "fit", cfg)
    assert not (tmp_path / "fit").exists()  # stopped before any work


def test_bad_matrix_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="matrix.json"):
        load_matrix(tmp_path)
    _make_matrix(tmp_path / "m", 2, 2, 16, n=8)
    (tmp_path / "m" / "view_01" / "frame_00.png").unlink()
    with pytest.raises(FileNotFoundError, match="view_01/frame_00.png"):
        run_fit(tmp_path / "m", tmp_path / "fit", _small_cfg(iterations=1))


def test_densify_and_prune_keeps_optimizer_in_step() -> None:
    g = init_random(40, generator=torch.Generator().manual_seed(0))
    cfg = _small_cfg(densify_fraction=0.25, prune_opacity=0.05, max_gaussians=1000)
    opt = make_optimizer(g, cfg)
    with torch.no_grad():
        g.opacity_logits[:5] = -10.0  # invisible: pruned
        g.means[5, 3] = 5.0  # far outside t in [0, 1] with a short time scale: pruned
    loss = (g.means ** 2).sum() + g.opacity_logits.sum() + g.sh_dc.sum()
    loss.backward()
    opt.step()
    grad = torch.zeros(40)
    grad[10:20] = torch.arange(10, dtype=torch.float32) + 1  # the 8 (25% of 34 kept) largest are 12..19
    stats = densify_and_prune(g, opt, grad, torch.ones(40), cfg, torch.Generator().manual_seed(0))
    assert stats == {"pruned": 6, "split": 8, "num": 40 - 6 - 8 + 16}
    assert g.num == 42
    for group in opt.param_groups:
        p = group["params"][0]
        assert p is getattr(g, group["name"]) and p.shape[0] == 42
        st = opt.state[p]
        if group["name"] in ("means", "opacity_logits", "sh_dc"):  # the ones that had gradients
            assert st["exp_avg"].shape == p.shape
            assert st["exp_avg"][-16:].abs().sum() == 0  # split rows restart their moments
            assert st["exp_avg"][:-16].abs().sum() > 0
    # another step runs with the remapped state
    ((g.means ** 2).sum() + g.sh_dc.sum()).backward()
    opt.step()


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
    # a changed config does not resume a stale checkpoint
    assert json.loads((tmp_path / "resumed" / "fit.json").read_text())["iterations"] == 6


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
