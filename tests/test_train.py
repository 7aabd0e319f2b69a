"""Miniature priors: training data, a training step, save / reload through the loaders."""

from __future__ import annotations

import torch

from d2.stages.cameras import orbit_azimuths
from d2.stages.priors import PriorsConfig, build_svd, build_sv3d_p, load_prior_folder, load_priors
from d2.train.data import DataConfig, check_disjoint, render_training_set, scene_seeds
from d2.stages.priors import build_mini
from d2.train.priors import (MiniModelConfig, TrainConfig, build_mini_prior, edm_loss, make_condition,
                             save_mini_prior, train_prior)

TINY = MiniModelConfig(resolution=8, num_frames=4, block_out_channels=(32, 32), attention_from_level=1,
                       clip_patch_size=4)


def test_training_scenes_are_disjoint_from_the_benchmark() -> None:
    import pytest

    from d2.train.data import benchmark_scenes
    from d2.world import random_training_scene

    cfg = DataConfig(resolution=8, num_frames=4, num_scenes=4, videos_per_scene=1, orbits_per_scene=1)
    seeds = scene_seeds(cfg)
    assert check_disjoint(seeds, resolution=8) > 0.02
    bench = benchmark_scenes()
    names = {b.name for b in bench}
    for s in seeds:
        assert random_training_scene(s).name not in names
    # the check can fail: a "training" factory that hands out a benchmark object is refused
    with pytest.raises(ValueError, match="benchmark object"):
        check_disjoint([0], resolution=8, scene_factory=lambda s: bench[0])
    ds = render_training_set(cfg, progress=False)
    assert ds.videos.shape == (4, 4, 3, 8, 8) and ds.videos.dtype == torch.uint8
    assert ds.orbits.shape == (4, 4, 3, 8, 8) and ds.orbit_elevations.shape == (4,)
    assert ds.videos.float().std() > 1.0  # not blank


def _toy_sequences(n: int, t: int, res: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [n, t, 3, res, res]: a coloured square moving right on white."""
    out = torch.full((n, t, 3, res, res), 255, dtype=torch.uint8)
    for i in range(n):
        col = (torch.rand(3, generator=gen) * 200).to(torch.uint8)
        for f in range(t):
            x0 = f % (res - 3)
            out[i, f, :, 2:5, x0:x0 + 3] = col[:, None, None]
    return out


def _fixed_loss(prior, seq: torch.Tensor, family: str, seed: int = 123) -> float:
    g = torch.Generator().manual_seed(seed)
    x = seq.float() / 255
    cond_img = x[:, 0] if family == "video" else x[:, -1]
    elev = torch.zeros(x.shape[0])
    drop = torch.zeros(x.shape[0], dtype=torch.bool)
    sigma = torch.tensor([0.3, 1.0, 3.0, 0.1])[: x.shape[0]]
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        cond = make_condition(prior, cond_img, x.shape[1], 0.02, elev, g, drop)
        return float(edm_loss(prior, x * 2 - 1, cond, sigma, noise))


def test_a_few_training_steps_lower_the_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    seq = _toy_sequences(4, 4, 8, gen)
    for family in ("video", "multiview"):
        cfg = TrainConfig(model=TINY, steps=25, batch_size=4, lr=2e-3, warmup_steps=1, ema_decay=0.0,
                          p_uncond=0.0, progress=False, seed=1)
        start = build_mini_prior(TINY, family, seed=1)
        before = _fixed_loss(start, seq, family)
        trained, summary = train_prior(family, seq, cfg, torch.zeros(4), prior=build_mini_prior(TINY, family, seed=1))
        after = _fixed_loss(trained, seq, family)
        assert summary["steps"] == 25
        assert after < 0.7 * before, (family, before, after)


def test_saved_priors_reload_through_the_loaders_with_identical_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8)
    sigma = torch.tensor([0.5, 4.0])
    images = torch.rand(2, 3, 8, 8)
    for family in ("video", "multiview"):
        prior = build_mini_prior(TINY, family, seed=3).eval()
        folder = tmp_path / family
        save_mini_prior(prior, folder, extra={"num_frames": 4}, half=True)
        size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        assert size < 2.2 * sum(p.numel() for p in prior.parameters())  # stored in fp16
        kw = {"azimuths_deg": orbit_azimuths(4), "elevations_deg": 10.0} if family == "multiview" else {}
        loaded = [load_prior_folder(folder, family)]
        cfg = PriorsConfig(video_path=str(folder), multiview_path=str(folder))
        loaded.append(build_mini(cfg, family, torch.device("cpu")))
        loaded.append(build_svd(cfg, family, torch.device("cpu")) if family == "video"
                      else build_sv3d_p(cfg, family, torch.device("cpu")))
        # the sampler's registry: backend "mini" reads the folders named by video_path / multiview_path
        pair = load_priors(PriorsConfig(backend="mini", video_path=str(tmp_path / "video"),
                                        multiview_path=str(tmp_path / "multiview"))) if family == "multiview" else None
        if pair is not None:
            loaded.append(pair[1])
        with torch.no_grad():
            cond = prior.condition(images, cond_aug=0.02, generator=torch.Generator().manual_seed(5), **kw)
            ref = prior.denoise(x, sigma, cond, torch.full((2, 4), 2.0))
            for other in loaded:
                other.eval()
                c2 = other.condition(images, cond_aug=0.02, generator=torch.Generator().manual_seed(5), **kw)
                out = other.denoise(x, sigma, c2, torch.full((2, 4), 2.0))
                assert other.family == family and other.resolution == 8
                torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_matrix_metrics_reference_points() -> None:
    from d2.train.experiment import matrix_metrics

    g = torch.rand(4, 5, 3, 16, 16)
    perfect = matrix_metrics(g, g, input_view=3)
    assert perfect["tde"] == 0 and perfect["vde"] == 0 and perfect["ssim"] > 0.999
    static = matrix_metrics(g[3:, :1].expand_as(g), g, input_view=3)
    true_dt = float(((g[:, 1:] - g[:, :-1]) ** 2).mean().sqrt())
    assert abs(static["tde"] - true_dt) < 1e-6 and static["flicker"] == 0
    # a per-row colour offset keeps every row's temporal differences: TDE 0, VDE > 0
    shifted = (g + torch.linspace(-0.2, 0.2, 4).view(4, 1, 1, 1, 1))
    m = matrix_metrics(shifted, g, input_view=3)
    assert m["tde"] < 1e-6 and m["vde"] > 0.05


def test_mirror_orbit_order_keeps_the_input_view_and_is_an_involution() -> None:
    from d2.train.priors import augment_batch, mirror_orbit_order

    order = mirror_orbit_order(8)
    assert order[-1] == 7 and sorted(order) == list(range(8))
    assert [order[i] for i in order] == list(range(8))
    # view v at +(v+1)*45 deg is the mirror image of the view at -(v+1)*45 deg = 360-(v+1)*45
    assert [((o + 1) * 45) % 360 for o in order[:-1]] == [(360 - (v + 1) * 45) % 360 for v in range(7)]
    seq = torch.rand(64, 8, 3, 4, 4)
    out = augment_batch(seq, "multiview", torch.Generator().manual_seed(0))
    flipped = [i for i in range(64) if not torch.equal(out[i], seq[i])]
    assert 10 < len(flipped) < 54
    for i in flipped:
        torch.testing.assert_close(out[i], seq[i][order].flip(-1))


def test_the_composition_experiment_runs_the_sampling_stages_methods(tmp_path) -> None:
    """One object, one seed, one step: every row is there; the extremes are the stage's methods;
    static (the stage's) has no motion and no view change."""
    from d2.train.experiment import ExperimentConfig, run_experiment, sampling_config

    cfg = ExperimentConfig(objects=["bouncing_ball"], seeds=[0], num_steps=1, rollback_steps=0, ablation=False,
                           progress=False)
    assert [sampling_config(m, 8, 8, 16, 0, cfg).method for m in ("composed", "video_only", "multiview_only")] == [
        "diffusion2", "video_only", "multiview_only"]
    rows = {r["method"]: r for r in run_experiment(tmp_path, cfg)["rows"]}
    assert list(rows) == ["truth", "static", "composed", "video_only", "multiview_only"]
    assert rows["truth"]["tde"] == 0 and rows["static"]["flicker"] == 0 and rows["static"]["view_change"] == 0
    assert len({round(rows[m]["psnr"], 4) for m in ("composed", "video_only", "multiview_only")}) == 3
    assert (tmp_path / "results.md").is_file() and (tmp_path / "images" / "sampled_bouncing_ball.png").is_file()
