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
    suite = M.build_metric_suite(cfg, definitions="d2")
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
    suite = M.build_metric_suite(cfg, clip_model=clip_model, lpips_net=lpips_net, definitions="d2")
    assert suite.unavailable == {}
    x, y = _structured(5, seed=10), _structured(5, seed=11)
    s = suite.score_images(x, y)
    assert all(s[k].shape == (5,) for k in ("clip", "lpips", "psnr", "ssim"))
    # batching does not change values
    whole = M.build_metric_suite(cfg.model_copy(update={"batch_size": 16}), clip_model=clip_model,
                                 lpips_net=lpips_net, definitions="d2").score_images(x, y)
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
    suite = M.build_metric_suite(M.MetricsConfig(metrics=["lpips"], lpips_vgg_weights=path, resolution=None),
                                 definitions="d2")
    assert suite.unavailable == {}
    del state["features.28.weight"]
    torch.save(state, path)
    with pytest.raises(KeyError):
        M.build_lpips(path)


# --------------------------------------------------------------------------- consistent4d definitions
#
# Golden tests: an independent reference that follows Consistent4D's
# evaluation/compute_image_level_metrics.py line by line (PIL, torchmetrics, a tiny random
# transformers CLIP with the PIL CLIPImageProcessor) against our protocol's per-image values.

from c4d_reference import close, script_pair, ssim_map_literal, ssim_script_era, tiny_hf_clip  # noqa: E402
from PIL import Image  # noqa: E402
from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr  # noqa: E402


@pytest.fixture(scope="module")
def hf_clip():
    return tiny_hf_clip()


def _smooth(h: int, w: int, lo: int, hi: int, seed: int) -> np.ndarray:
    """Image-like uint8 [h, w, 3] with values in [lo, hi]."""
    g = np.random.default_rng(seed)
    low = torch.from_numpy(g.random((1, 3, 5, 5))).float()
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    x = (x.numpy() + 0.15 * g.random((h, w, 3))) / 1.15
    return np.round(lo + (hi - lo) * x).astype(np.uint8)


def _pairs(root: Path) -> list[tuple[Path, Path, bool]]:
    """(pred, gt, gt_is_rgba) PNG pairs: partial and full black-to-white range (in either image), different
    and unequal sizes, RGBA gt."""
    root.mkdir(parents=True, exist_ok=True)
    out = []

    def save(name: str, arr: np.ndarray) -> Path:
        p = root / f"{name}.png"
        Image.fromarray(arr).save(p)
        return p

    # 1. mid-range only (data ranges well below 255), 64 x 64
    out.append((save("p1", _smooth(64, 64, 60, 170, 1)), save("g1", _smooth(64, 64, 70, 190, 2)), False))
    # 2. full black-to-white range in both, non-square 48 x 80
    full_p, full_g = _smooth(48, 80, 0, 255, 3), _smooth(48, 80, 0, 255, 4)
    full_p[0, 0], full_p[-1, -1] = 0, 255
    full_g[0, 0], full_g[-1, -1] = 0, 255
    out.append((save("p2", full_p), save("g2", full_g), False))
    # 3. RGBA ground truth (transparent background, partly transparent edge) vs an RGB prediction, 40 x 40
    rgb = _smooth(40, 40, 20, 230, 5)
    alpha = np.zeros((40, 40), np.uint8)
    alpha[8:32, 10:30] = 255
    alpha[7, 10:30] = 128
    rgba = np.dstack([rgb, alpha])
    pred3 = np.where(alpha[..., None] > 0, _smooth(40, 40, 20, 230, 6), 255).astype(np.uint8)
    out.append((save("p3", pred3), save("g3", rgba), True))
    # 4. prediction and ground truth of different sizes (both go to 512), full range in gt only
    out.append((save("p4", _smooth(32, 32, 30, 200, 7)), save("g4", _smooth(96, 96, 0, 255, 8)), False))
    # 5. full-range prediction, low-contrast ground truth (SSIM's data range comes from the prediction)
    out.append((save("p5", _smooth(24, 24, 0, 255, 11)), save("g5", _smooth(24, 24, 90, 160, 12)), False))
    return out


def test_consistent4d_per_image_values_equal_the_script(tmp_path: Path, hf_clip):
    model, processor = hf_clip
    pairs = _pairs(tmp_path)
    suite = M.build_metric_suite(M.MetricsConfig(metrics=["clip", "psnr", "ssim"], resolution=512, batch_size=3),
                                 clip_model=model, clip_processor=processor, definitions="consistent4d")
    ours = suite.score_files([p for p, _, _ in pairs], [g for _, g, _ in pairs])
    for i, (p, g, rgba) in enumerate(pairs):
        ref = script_pair(p, g, model, processor, gt_rgba=rgba)
        for m in ("clip", "psnr", "ssim"):
            assert close(m, ours[m][i].item(), float(ref[m])), (i, m, ours[m][i].item(), float(ref[m]))
    # the cases differ in what the data range does: pair 1 has no full range (PSNR's range < 255)
    assert not ours["psnr_capped"].any()
    r1 = np.array(Image.open(pairs[0][1]).resize((512, 512))).astype(float)
    assert r1.max() - r1.min() < 200
    # the d2 definitions give different numbers on the same pairs (the gap the issue measured)
    d2 = M.build_metric_suite(M.MetricsConfig(metrics=["psnr", "ssim"], resolution=512), definitions="d2")
    d2_vals = d2.score_files([p for p, _, _ in pairs], [g for _, g, _ in pairs])
    assert max(abs(d2_vals["ssim"][i].item() - ours["ssim"][i].item()) for i in range(len(pairs))) > 1e-3


def test_consistent4d_image_conversion_is_the_scripts():
    """PIL's default resize filter is bicubic; RGBA: only alpha-0 pixels become white; the PIL
    CLIP processor equals bicubic-to-224 + OpenAI mean/std by hand (the processor of the script's time)."""
    from d2.eval import consistent4d as C

    rgba = np.dstack([_smooth(30, 50, 0, 255, 9), np.tile(np.array([0, 77, 255], np.uint8), (30, 17))[:, :50]])
    img = Image.fromarray(rgba)
    conv = np.array(C.on_white(img))
    assert (conv[rgba[..., 3] == 0] == 255).all()
    keep = rgba[..., 3] > 0
    assert np.array_equal(conv[keep], rgba[..., :3][keep])  # partly transparent pixels keep their colour
    rgb = Image.fromarray(_smooth(30, 50, 0, 255, 10))
    assert np.array_equal(np.array(C.script_image(rgb)), np.array(rgb.resize((512, 512))))
    assert not np.array_equal(np.array(C.script_image(rgb)),
                              np.array(rgb.resize((512, 512), resample=Image.Resampling.BILINEAR)))
    proc = C.clip_processor_class()()
    big = C.script_image(rgb)
    pv = proc(images=[big], return_tensors="pt")["pixel_values"][0].numpy()
    hand = np.asarray(big.resize((224, 224), Image.Resampling.BICUBIC)).astype(np.float32) / 255
    hand = ((hand - np.array(M.CLIP_MEAN, np.float32)) / np.array(M.CLIP_STD, np.float32)).transpose(2, 0, 1)
    assert np.abs(pv - hand).max() < 1e-6


def test_consistent4d_psnr_data_range_is_passed_explicitly():
    """With data range = gt max - min, a low-contrast ground truth gives a lower PSNR than data range 255."""
    from d2.eval import consistent4d as C

    g = torch.full((1, 3, 16, 16), 100.0)
    g[..., :8] = 150.0  # range 50
    p = g + 5.0
    ours = C.psnr_script(p, g).item()
    assert ours == pytest.approx(10 * math.log10(50.0**2 / 25.0), abs=1e-4)
    assert ours < tm_psnr(p, g, data_range=255.0).item() - 10
    same = C.psnr_script(g, g)
    assert torch.isinf(same).all()  # identical images: +inf, as the script (not capped)


def _ssim_pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[1, 3, H, W] pairs in [0, 255]: smooth images, and a pair equal inside but different in a 5-px frame."""
    pairs = []
    for seed, (h, w) in enumerate([(64, 48), (37, 90)]):
        a, b = _smooth(h, w, 0, 255, 20 + seed), _smooth(h, w, 30, 220, 40 + seed)
        pairs.append((torch.from_numpy(a).float().permute(2, 0, 1)[None],
                      torch.from_numpy(b).float().permute(2, 0, 1)[None]))
    inside = torch.from_numpy(_smooth(60, 60, 40, 200, 7)).float().permute(2, 0, 1)[None]
    noisy = inside.clone()
    g = torch.Generator().manual_seed(3)
    frame = torch.ones(60, 60, dtype=torch.bool)
    frame[5:-5, 5:-5] = False
    noisy[..., frame] = torch.randint(0, 256, (1, 3, int(frame.sum())), generator=g).float()
    pairs.append((noisy, inside))
    return pairs


def _on_white() -> tuple[torch.Tensor, torch.Tensor]:
    """Two textured squares on a flat white background, slightly offset: [1, 3, 96, 96] in [0, 255]."""
    rng = np.random.default_rng(0)
    a = np.full((96, 96, 3), 255, np.uint8)
    b = a.copy()
    a[20:70, 25:75] = np.clip(rng.normal(120, 30, (50, 50, 3)), 0, 255)
    b[24:74, 22:72] = np.clip(rng.normal(110, 30, (50, 50, 3)), 0, 255)
    return tuple(torch.from_numpy(x).float().permute(2, 0, 1)[None] for x in (a, b))


def _range(p: torch.Tensor, g: torch.Tensor) -> float:
    return float(max(p.max() - p.min(), g.max() - g.min()))


def test_consistent4d_ssim_is_the_cropped_mean_of_the_ssim_map():
    """The consistent4d SSIM is the mean of the SSIM map without its 5-px border (the torchmetrics of the
    script's time), whatever torchmetrics is installed: equal to a literal float64 SSIM map cropped by 5 px
    and to scikit-image up to float32 rounding (2e-5); the uncropped mean of the same map differs when the
    border differs. The float32 map is torchmetrics' own arithmetic: equal to its full map where no
    variance is clamped."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    from d2.eval import consistent4d as C

    assert C.SSIM_BORDER == 5
    for i, (p, g) in enumerate(_ssim_pairs() + [_on_white()]):
        full = ssim_map_literal(p[0].numpy(), g[0].numpy(), _range(p, g))
        ours = C.ssim_script(p, g).item()
        assert ours == pytest.approx(full[:, 5:-5, 5:-5].mean(), abs=2e-5), i
        assert ours == pytest.approx(ssim_script_era(p, g), abs=2e-5), i
        mp = C.ssim_map_script(p, g, _range(p, g))[0]
        assert np.abs(mp.double().numpy() - full).max() < 1e-3  # the whole map, reflect-padded border included
        if i < 3:  # textured images: no float32 variance below 0, so no clamping in torchmetrics
            assert torch.equal(mp, tm_ssim(p, g, data_range=_range(p, g), return_full_image=True)[1][0])
    noisy, inside = _ssim_pairs()[-1]
    full = ssim_map_literal(noisy[0].numpy(), inside[0].numpy(), _range(noisy, inside))
    assert full.mean() < C.ssim_script(noisy, inside).item() - 0.2  # the frame drags the uncropped mean down
    with pytest.raises(ValueError, match="smaller than the 11-px window"):
        C.ssim_script(torch.zeros(1, 3, 10, 40), torch.zeros(1, 3, 10, 40))


def test_installed_torchmetrics_ssim_border_against_the_reference():
    """torchmetrics averages the whole SSIM map from 1.4.2 on and the map without its 5-px border before;
    from 1.3.2 on it clamps float32 variances at 0, which lowers the SSIM of images on a flat background.
    The installed release matches the literal map's mean with its own border handling and not the other
    one, so the consistent4d SSIM (always cropped, never clamped) may differ from it."""
    import torchmetrics
    from packaging.version import Version
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    from d2.eval import consistent4d as C

    version = Version(torchmetrics.__version__)
    crops = version < Version("1.4.2")
    for p, g in _ssim_pairs():
        full = ssim_map_literal(p[0].numpy(), g[0].numpy(), _range(p, g))
        tm = tm_ssim(p, g, data_range=_range(p, g)).item()
        assert tm == pytest.approx(full[:, 5:-5, 5:-5].mean() if crops else full.mean(), abs=2e-5)
    noisy, inside = _ssim_pairs()[-1]
    full = ssim_map_literal(noisy[0].numpy(), inside[0].numpy(), _range(noisy, inside))
    other = full.mean() if crops else full[:, 5:-5, 5:-5].mean()
    assert abs(tm_ssim(noisy, inside, data_range=_range(noisy, inside)).item() - other) > 0.2
    if version >= Version("1.3.2"):
        p, g = _on_white()
        exact = ssim_map_literal(p[0].numpy(), g[0].numpy(), _range(p, g))[:, 5:-5, 5:-5].mean()
        tm_full = tm_ssim(p, g, data_range=_range(p, g), return_full_image=True)[1]
        assert tm_full[..., 5:-5, 5:-5].mean().item() < exact - 1e-4  # clamped: one-sided float32 error
        assert abs(C.ssim_script(p, g).item() - exact) < 2e-5


def test_consistent4d_protocol_states_the_ssim_definition():
    from d2.eval.protocol import Protocol

    assert "SSIM map without its 5-px border" in Protocol.consistent4d().describe()
    assert "5-px border cropped" in M.metric_definitions("consistent4d")["ssim"]
    assert "5-px border" not in Protocol.d2_clean().describe()


@pytest.mark.slow
def test_consistent4d_lpips_equals_torchmetrics_metric(tmp_path: Path, monkeypatch, hf_clip):
    """LPIPS: our torchmetrics network, loaded from a VGG16 state dict, against the script's
    LearnedPerceptualImagePatchSimilarity(net_type='vgg') whose torchvision backbone is the same
    random VGG16 (no ImageNet weights exist here; the structure and input mapping are what is tested)."""
    import torchvision
    import torchmetrics.functional.image.lpips as tm_lpips_mod
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    from d2.eval import consistent4d as C

    torch.manual_seed(1)
    features = torchvision.models.vgg16(weights=None).features
    monkeypatch.setattr(tm_lpips_mod, "_get_tv_model_features", lambda net, pretrained=False: features)
    lpip = LearnedPerceptualImagePatchSimilarity(net_type="vgg", reduction="mean")
    state = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
    ours_net = C.build_lpips_script(vgg_state=state)
    model, processor = hf_clip
    p, g, rgba = _pairs(tmp_path)[2]
    ref = script_pair(p, g, model, processor, gt_rgba=rgba, lpip=lpip)
    suite = M.build_metric_suite(M.MetricsConfig(metrics=["lpips"], resolution=512), lpips_net=ours_net,
                                 definitions="consistent4d")
    ours = suite.score_files([p], [g])["lpips"][0].item()
    assert ours == pytest.approx(ref["lpips"], abs=1e-6) and ours > 0


def test_consistent4d_missing_weights_are_unavailable_with_reason(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = M.MetricsConfig(metrics=["clip", "lpips", "psnr"], lpips_vgg_weights=tmp_path / "no_vgg.pth",
                          i3d_weights=tmp_path / "no_i3d.pt")
    suite = M.build_metric_suite(cfg, definitions="consistent4d")
    assert set(suite.unavailable) == {"clip", "lpips"}
    assert "no_vgg.pth" in suite.unavailable["lpips"]
    assert "openai/clip-vit-base-patch32" in suite.unavailable["clip"]
    assert str(tmp_path / "hf" / "models--openai--clip-vit-base-patch32") in suite.unavailable["clip"]
    assert suite.image_metrics == ["psnr"]
    with pytest.raises(ValueError, match="clip_processor"):
        M.build_metric_suite(M.MetricsConfig(metrics=["clip"]), clip_model=torch.nn.Linear(1, 1))
