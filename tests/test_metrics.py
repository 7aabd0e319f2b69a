"""Metrics: identical-image values, agreement with scikit-image, symmetry and batch-order
invariance of the CLIP / LPIPS code paths on random-weight networks, FVD's Frechet distance,
and unavailability when weights are missing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from d2.eval import metrics as M


@pytest.fixture(scope="module")
def lpips_net():
    torch.manual_seed(0)
    return M.build_lpips(random_backbone=True)


@pytest.fixture(scope="module")
def clip_model():
    return M.tiny_clip_model()


def _structured(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Random but image-like inputs (smooth blobs + noise): [n, 3, size, size] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def test_identical_images(lpips_net, clip_model):
    x = _structured(3)
    assert torch.allclose(M.ssim(x, x), torch.ones(3), atol=1e-6)
    p = M.psnr(x, x)
    assert torch.isfinite(p).all() and torch.allclose(p, torch.full((3,), M.PSNR_CAP_DB))
    assert M.psnr_capped(x, x).all()
    assert torch.allclose(M.lpips_distance(lpips_net, x, x), torch.zeros(3), atol=1e-7)
    assert torch.allclose(M.clip_similarity(clip_model, x, x, eval_resolution=64), torch.ones(3), atol=1e-5)


def test_different_images_not_flagged(lpips_net):
    x, y = _structured(2, seed=1), _structured(2, seed=2)
    assert not M.psnr_capped(x, y).any()
    assert (M.lpips_distance(lpips_net, x, y) > 0).all()
    assert (M.ssim(x, y) < 0.99).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_ssim_match_scikit_image(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 40, 33, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(2, 3, 40, 33, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours_p, ours_s = M.psnr(x, y), M.ssim(x, y)
    for i in range(2):
        a, b = x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy()
        ref_p = peak_signal_noise_ratio(a, b, data_range=1.0)
        ref_s = structural_similarity(a, b, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
        assert abs(ours_p[i].item() - ref_p) < 1e-9
        assert abs(ours_s[i].item() - ref_s) < 1e-9, (ours_s[i].item(), ref_s)


def test_ssim_is_differentiable():
    x = _structured(1, seed=3).requires_grad_(True)
    y = _structured(1, seed=4)
    (1 - M.ssim(x, y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_metric_input_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        M.ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))
    with pytest.raises(ValueError, match="smaller than"):
        M.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_lpips_symmetric_and_batch_order_invariant(lpips_net):
    x, y = _structured(4, seed=5), _structured(4, seed=6)
    d = M.lpips_distance(lpips_net, x, y)
    assert torch.allclose(d, M.lpips_distance(lpips_net, y, x), atol=1e-6)
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.allclose(M.lpips_distance(lpips_net, x[perm], y[perm]), d[perm], atol=1e-6)


def test_clip_symmetric_and_batch_order_invariant(clip_model):
    x, y = _structured(4, seed=7), _structured(4, seed=8)
    s = M.clip_similarity(clip_model, x, y, eval_resolution=64)
    assert torch.allclose(s, M.clip_similarity(clip_model, y, x, eval_resolution=64), atol=1e-6)
    perm = torch.tensor([3, 1, 0, 2])
    assert torch.allclose(M.clip_similarity(clip_model, x[perm], y[perm], eval_resolution=64), s[perm], atol=1e-6)
    assert (s <= 1 + 1e-6).all() and (s < 1 - 1e-6).any()


def test_clip_preprocess_shape_and_normalisation():
    white = torch.ones(2, 3, 100, 100)
    out = M.clip_preprocess(white, eval_resolution=512)
    assert out.shape == (2, 3, 224, 224)
    expect = (1 - torch.tensor(M.CLIP_MEAN)) / torch.tensor(M.CLIP_STD)
    assert torch.allclose(out[0, :, 100, 100], expect, atol=1e-4)


def test_frechet_distance_analytic():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert abs(M.frechet_distance(a, a)) < 1e-8
    b = a + np.array([3.0, 0.0, 4.0])  # same covariance, mean shifted by a vector of length 5
    assert abs(M.frechet_distance(a, b) - 25.0) < 1e-6
    c = a * 2.0  # covariance scaled by 4: trace term = tr(S + 4S - 2*2S) = tr(S)
    s_trace = np.trace(np.cov(a, rowvar=False))
    mu = a.mean(0)
    assert abs(M.frechet_distance(a, c) - (s_trace + float((mu - 2 * mu) @ (mu - 2 * mu)))) < 1e-6
    with pytest.raises(ValueError, match="at least 2"):
        M.frechet_distance(a[:1], b[:1])


def test_fvd_pooled_with_pluggable_extractor():
    def extractor(videos: torch.Tensor) -> torch.Tensor:  # [B, T, 3, H, W] -> [B, 2]: mean colour over time
        return torch.stack([videos.mean(dim=(1, 2, 3, 4)), videos[:, :, 0].mean(dim=(1, 2, 3))], dim=-1)

    vids = [torch.rand(4, 3, 8, 8) for _ in range(6)]
    assert abs(M.fvd_pooled(vids, vids, extractor)) < 1e-8
    shifted = [(v * 0.5) for v in vids]
    assert M.fvd_pooled(vids, shifted, extractor) > 0.01


def test_missing_weights_make_metrics_unavailable(tmp_path: Path):
    missing = tmp_path / "nope" / "vgg16.pth"
    cfg = M.MetricsConfig(lpips_vgg_weights=missing, clip_weights=tmp_path / "clip.bin",
                          i3d_weights=tmp_path / "i3d.pt", resolution=None)
    with pytest.raises(M.MetricUnavailable, match=str(missing)):
        M.build_lpips(missing)
    suite = M.build_metric_suite(cfg)
    assert set(suite.unavailable) == {"clip", "lpips", "fvd"}
    assert str(missing) in suite.unavailable["lpips"]
    assert suite.image_metrics == ["psnr", "ssim"]
    scores = suite.score_images(_structured(2), _structured(2, seed=9))
    assert set(scores) == {"psnr", "psnr_capped", "ssim"}
    suite.require(["psnr", "ssim"])
    with pytest.raises(M.MetricUnavailable, match="lpips"):
        suite.require(["clip", "lpips"])
    with pytest.raises(ValueError, match="unknown metric"):
        M.parse_metric_list("clip,fid")
    assert M.parse_metric_list(" clip, LPIPS ") == ["clip", "lpips"]


def test_suite_with_injected_random_nets_scores_all(lpips_net, clip_model):
    cfg = M.MetricsConfig(metrics=["clip", "lpips", "psnr", "ssim"], resolution=32, batch_size=3)
    suite = M.build_metric_suite(cfg, clip_model=clip_model, lpips_net=lpips_net)
    assert suite.unavailable == {}
    x, y = _structured(5, seed=10), _structured(5, seed=11)
    s = suite.score_images(x, y)
    assert all(s[k].shape == (5,) for k in ("clip", "lpips", "psnr", "ssim"))
    # batching does not change values
    whole = M.build_metric_suite(cfg.model_copy(update={"batch_size": 16}), clip_model=clip_model,
                                 lpips_net=lpips_net).score_images(x, y)
    for k in ("clip", "lpips", "psnr", "ssim"):
        assert torch.allclose(s[k], whole[k], atol=1e-6)
    assert not math.isnan(float(s["lpips"].mean()))


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "torchscript"])
def test_clip_checkpoint_loader_round_trips(tmp_path: Path, fmt: str, clip_model):
    """The weight-file path of CLIP: a saved model loads back into a fresh one with identical features."""
    from safetensors.torch import save_file

    path = tmp_path / f"clip.{ 'pt' if fmt == 'torchscript' else fmt}"
    state = {k: v.contiguous() for k, v in clip_model.state_dict().items()}
    if fmt == "bin":
        torch.save(state, path)
    elif fmt == "safetensors":
        save_file(state, str(path))
    else:  # OpenAI's own file is a TorchScript archive of the whole model
        torch.jit.script(clip_model).save(str(path))
    fresh = M.tiny_clip_model(seed=1)
    x = _structured(2, seed=12)
    assert not torch.allclose(M.clip_image_features(fresh, x, 64), M.clip_image_features(clip_model, x, 64))
    M.load_clip_checkpoint(fresh, path)
    assert torch.allclose(M.clip_image_features(fresh, x, 64), M.clip_image_features(clip_model, x, 64), atol=1e-6)


def test_lpips_vgg_file_is_loaded(tmp_path: Path, lpips_net):
    """A torchvision-style VGG16 file (features.{i}.weight/bias) is copied into lpips' sliced backbone."""
    g = torch.Generator().manual_seed(3)
    state = {}
    for k in range(1, 6):
        for name, mod in getattr(lpips_net.net, f"slice{k}").named_children():
            if isinstance(mod, torch.nn.Conv2d):
                state[f"features.{name}.weight"] = torch.randn(mod.weight.shape, generator=g) * 0.05
                state[f"features.{name}.bias"] = torch.randn(mod.bias.shape, generator=g) * 0.05
    path = tmp_path / M.VGG16_FILENAME
    torch.save(state, path)
    net = M.build_lpips(path)
    assert torch.equal(net.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(dict(net.net.slice5.named_children())["28"].bias, state["features.28.bias"])
    suite = M.build_metric_suite(M.MetricsConfig(metrics=["lpips"], lpips_vgg_weights=path, resolution=None))
    assert suite.unavailable == {}
    del state["features.28.weight"]
    torch.save(state, path)
    with pytest.raises(KeyError):
        M.build_lpips(path)
