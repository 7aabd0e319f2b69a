"""The prior interface: EDM preconditioning, CFG, gradients, Gaussian closed form, folders, backends."""

import math

import pytest
import torch
from pydantic import ValidationError

from d2.stages.cameras import orbit_azimuths
from d2.stages.priors import (
    BACKENDS,
    GaussianPriorConfig,
    MissingWeightsError,
    PixelSpaceVAE,
    PriorCondition,
    PriorsConfig,
    TinyPriorConfig,
    build_sv3d_p,
    build_svd,
    build_tiny_prior,
    edm_coefficients,
    load_prior_folder,
    load_priors,
    save_prior_folder,
)


@pytest.fixture(scope="module")
def tiny():
    return load_priors(PriorsConfig(backend="tiny"))


def _cond(prior, n, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(n, 3, prior.resolution, prior.resolution, generator=g)
    kw = {"azimuths_deg": orbit_azimuths(t), "elevations_deg": 10.0} if prior.family == "multiview" else {}
    return prior.condition(imgs, cond_aug=0.02, generator=g, **kw)


def test_edm_coefficients_formulas():
    s = torch.tensor([0.002, 1.0, 700.0])
    c_skip, c_out, c_in, c_noise = edm_coefficients(s)
    for i, si in enumerate(s.tolist()):
        assert math.isclose(c_skip[i].item(), 1 / (si**2 + 1), rel_tol=1e-6)
        assert math.isclose(c_out[i].item(), -si / math.sqrt(si**2 + 1), rel_tol=1e-6)
        assert math.isclose(c_in[i].item(), 1 / math.sqrt(si**2 + 1), rel_tol=1e-6)
        assert math.isclose(c_noise[i].item(), math.log(si) / 4, rel_tol=1e-5)


@pytest.mark.parametrize("family", ["video", "multiview"])
def test_denoise_is_preconditioned_unet_with_cfg_inside(tiny, family):
    prior = tiny[0] if family == "video" else tiny[1]
    b, t = 2, 4
    cond = _cond(prior, b, t)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, t, prior.latent_channels, prior.latent_size, prior.latent_size, generator=g) * 3
    sigma = torch.tensor([0.5, 3.0])
    cfg = torch.linspace(1.5, 3.0, t)[None].repeat(b, 1)

    def manual(c: PriorCondition) -> torch.Tensor:  # independent: call the UNet directly
        s = sigma.view(b, 1, 1, 1, 1)
        inp = torch.cat([x / (s**2 + 1).sqrt(), c.concat[:, None].expand(b, t, -1, -1, -1)], dim=2)
        f = prior.unet(inp, sigma.log() / 4, c.context, c.added_ids).sample
        return x / (s**2 + 1) - s / (s**2 + 1).sqrt() * f

    with torch.no_grad():
        d_c = manual(cond)
        d_u = manual(PriorCondition(torch.zeros_like(cond.context), torch.zeros_like(cond.concat), cond.added_ids))
        expect = d_u + cfg.view(b, t, 1, 1, 1) * (d_c - d_u)
        got = prior.denoise(x, sigma, cond, cfg)
        got1 = prior.denoise(x, sigma, cond, 1.0)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got1, d_c, atol=1e-5, rtol=1e-4)
    assert got.dtype == torch.float32 and got.shape == x.shape


def test_denoise_is_differentiable_wrt_unet_weights():
    prior = build_tiny_prior(TinyPriorConfig(vae=False), "multiview")
    cond = _cond(prior, 2, 3)
    x = torch.randn(2, 3, 3, 32, 32)
    loss = prior.denoise(x, torch.tensor([0.7, 2.0]), cond, 2.0).square().mean()
    loss.backward()
    grads = [p.grad for p in prior.unet.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_encode_decode_shapes_and_pixel_space_identity(tiny):
    video = tiny[0]
    imgs = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        z = video.encode(imgs)
        out = video.decode(z)
    assert z.shape == (3, 4, 16, 16) and video.vae_scale_factor == 2
    assert out.shape == imgs.shape and out.min() >= 0 and out.max() <= 1
    pix = build_tiny_prior(TinyPriorConfig(vae=False), "video")
    assert isinstance(pix.vae, PixelSpaceVAE) and pix.vae_scale_factor == 1 and pix.latent_channels == 3
    torch.testing.assert_close(pix.decode(pix.encode(imgs)), imgs, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="32x32"):
        video.encode(torch.rand(1, 3, 16, 16))


def test_multiview_condition_carries_per_frame_cameras(tiny):
    mv = tiny[1]
    cond = _cond(mv, 2, 5)
    assert cond.added_ids.shape == (2, 5, 3)
    az = cond.added_ids[0, :, 2]
    torch.testing.assert_close(az, torch.tensor([math.radians(a) for a in orbit_azimuths(5)]))
    assert math.isclose(cond.added_ids[0, 0, 1].item(), math.radians(80.0), rel_tol=1e-6)
    with pytest.raises(ValueError, match="azimuths"):
        mv.condition(torch.rand(1, 3, 32, 32), cond_aug=0.0)


def test_gaussian_prior_denoiser_is_the_posterior_mean():
    gcfg = GaussianPriorConfig(std=0.7, video_rho=0.8, video_offset=0.3)
    video, _ = load_priors(PriorsConfig(backend="gaussian", gaussian=gcfg))
    t = 4
    imgs = torch.rand(1, 3, 8, 8)
    cond = video.condition(imgs, cond_aug=0.0)
    x = torch.randn(1, t, 3, 8, 8)
    sigma = 1.3
    d = video.denoise(x, torch.tensor([sigma]), cond, 1.0)
    # independent: one pixel, numpy-free explicit Gaussian conditioning in float64
    cov = torch.tensor([[0.49 * 0.8 ** abs(i - j) for j in range(t)] for i in range(t)], dtype=torch.float64)
    m = 0.3 + (imgs[0, :, 2, 5].double() * 2 - 1)  # pixel-space latent of the conditioning image
    for c in range(3):
        xs = x[0, :, c, 2, 5].double()
        post = m[c] + cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(t, dtype=torch.float64)) @ (xs - m[c])
        torch.testing.assert_close(d[0, :, c, 2, 5].double(), post, atol=1e-5, rtol=1e-5)
    # sigma -> 0 returns x, sigma -> inf returns the mean
    torch.testing.assert_close(video.denoise(x, torch.tensor([1e-4]), cond, 1.0), x, atol=1e-4, rtol=0)
    big = video.denoise(x, torch.tensor([1e4]), cond, 1.0)
    torch.testing.assert_close(big, (0.3 + (imgs * 2 - 1))[:, None].expand_as(x), atol=1e-4, rtol=0)


def test_prior_folder_roundtrip(tmp_path, tiny):
    for prior in (tiny[1], build_tiny_prior(TinyPriorConfig(vae=False), "video")):
        folder = tmp_path / prior.family
        save_prior_folder(prior, folder, extra={"note": "test"})
        loaded = load_prior_folder(folder)
        assert loaded.family == prior.family and loaded.resolution == prior.resolution
        assert type(loaded.unet) is type(prior.unet) and type(loaded.vae) is type(prior.vae)
        cond = _cond(prior, 2, 3)
        x = torch.randn(2, 3, prior.latent_channels, prior.latent_size, prior.latent_size)
        with torch.no_grad():
            torch.testing.assert_close(loaded.denoise(x, torch.tensor([0.4, 9.0]), cond, 2.0),
                                       prior.denoise(x, torch.tensor([0.4, 9.0]), cond, 2.0))
            torch.testing.assert_close(loaded.clip_embed(torch.rand(1, 3, 32, 32).fill_(0.5)),
                                       prior.clip_embed(torch.rand(1, 3, 32, 32).fill_(0.5)))
    # the svd / sv3d_p backends read the same layout
    v = build_svd(PriorsConfig(video_path=str(tmp_path / "video")), "video", torch.device("cpu"))
    m = build_sv3d_p(PriorsConfig(multiview_path=str(tmp_path / "multiview")), "multiview", torch.device("cpu"))
    assert v.family == "video" and m.family == "multiview"


def test_missing_weights_errors_name_every_file(tmp_path):
    cfg = PriorsConfig(backend="stability", hf_cache_dir=str(tmp_path / "hf"))
    with pytest.raises(MissingWeightsError) as e:
        load_priors(cfg)
    msg = str(e.value)
    for f in ["unet/diffusion_pytorch_model.safetensors", "vae/config.json", "image_encoder/model.safetensors",
              "feature_extractor/preprocessor_config.json", str(tmp_path / "hf"), "huggingface-cli download",
              "sv3d_p.safetensors", "sv3d_p components"]:  # both families' files in one error
        assert f in msg
    (tmp_path / "svd" / "unet").mkdir(parents=True)
    (tmp_path / "svd" / "unet" / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError) as e:
        build_svd(PriorsConfig(video_path=str(tmp_path / "svd")), "video", torch.device("cpu"))
    assert "unet/diffusion_pytorch_model.safetensors" in str(e.value) and "vae/config.json" in str(e.value)
    with pytest.raises(MissingWeightsError, match="sv3d_p.safetensors"):
        build_sv3d_p(PriorsConfig(multiview_path=str(tmp_path / "nope.safetensors")), "multiview",
                     torch.device("cpu"))


def test_every_backend_module_is_in_the_cache_key_of_a_stage_that_loads_priors():
    from d2.execution.cache import module_closure

    closure = module_closure(["d2.stages.priors"])
    for module in ("base", "config", "folder", "gaussian", "tiny", "mini", "svd", "sv3d_p"):
        assert f"d2.stages.priors.{module}" in closure, module
    assert "d2.stages.sv3d" in closure  # the SV3D UNet and its key conversion
    closure = module_closure(["d2.stages.sampling"])  # imports only the Prior interface
    assert {"d2.stages.priors", "d2.stages.priors.tiny", "d2.stages.priors.sv3d_p"} <= set(closure)


def test_backends_are_chosen_per_family_and_unknown_names_fail_in_the_config():
    v, m = load_priors(PriorsConfig(backend="tiny", video_backend="gaussian"))
    assert v.name == "gaussian-video" and m.name == "tiny-multiview"
    assert BACKENDS == ("gaussian", "tiny", "mini", "svd", "sv3d_p", "stability")
    for key in ("backend", "video_backend", "multiview_backend"):
        with pytest.raises(ValidationError, match=f"priors.{key} = 'nope' is not a priors backend; known: gaussian"):
            PriorsConfig(**{key: "nope"})
    with pytest.raises(ValueError, match="'svd' is a video prior"):
        load_priors(PriorsConfig(backend="tiny", multiview_backend="svd"))
