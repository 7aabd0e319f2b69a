"""4D Gaussians: rotations, slicing (against the precision-matrix form), colours, initialisation."""

from __future__ import annotations

import math

import torch

from d2.stages.cameras import OrbitSpec, frame_times, orbit_azimuths, orbit_cameras
from d2.stages.gaussians import (
    Gaussians4D,
    eval_sh,
    init_from_images,
    init_random,
    rgb_to_sh_dc,
    rotation_4d,
)


def test_rotation_is_special_orthogonal() -> None:
    q = torch.randn(20, 2, 4, dtype=torch.float64)
    R = rotation_4d(q[:, 0], q[:, 1])
    eye = torch.eye(4, dtype=torch.float64).expand(20, 4, 4)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(20, dtype=torch.float64))


def _tilted(theta: float, sx: float, st: float, mean=(0.1, -0.2, 0.3, 0.4)) -> Gaussians4D:
    """One Gaussian rotated by theta in the x-t plane: q_l = q_r = (cos(theta/2), sin(theta/2), 0, 0)."""
    g = Gaussians4D(1, sh_degree=0, time_basis=0, dtype=torch.float64)
    q = torch.tensor([[math.cos(theta / 2), math.sin(theta / 2), 0.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        g.means.copy_(torch.tensor([mean], dtype=torch.float64))
        g.log_scales.copy_(torch.log(torch.tensor([[sx, 0.05, 0.07, st]], dtype=torch.float64)))
        g.quats_l.copy_(q)
        g.quats_r.copy_(q)
        g.opacity_logits.fill_(2.0)
    return g


def test_uncorrelated_gaussian_keeps_its_mean() -> None:
    g = _tilted(0.0, 0.1, 0.2)
    q = torch.randn(1, 4, dtype=torch.float64)
    g.quats_l.data = q  # q v q^-1: a rotation of x, y, z only
    g.quats_r.data = q * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    cov = g.covariance()[0]
    assert cov[:3, 3].abs().max() < 1e-12  # no space-time correlation
    assert cov[:3, :3].abs().sum() - cov[:3, :3].diagonal().abs().sum() > 1e-4  # but it is rotated in space
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    means, covs, opac = g.slice(t)
    torch.testing.assert_close(means[:, 0], g.means[0, :3].detach().expand(7, 3))
    torch.testing.assert_close(covs[:, 0], cov[:3, :3].expand(7, 3, 3))
    # the temporal marginal: peak opacity at mu_t, Gaussian fall-off with the t scale
    expect = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64)) * torch.exp(-0.5 * (t - 0.4) ** 2 / 0.2 ** 2)
    torch.testing.assert_close(opac[:, 0], expect)


def _velocity(theta: float, sx: float, st: float) -> float:
    """dx/dt of the conditional mean of diag(sx^2, st^2) whose x axis is turned to (cos, -sin) in (x, t)."""
    s, c = math.sin(theta), math.cos(theta)
    s_xt = -(sx ** 2) * c * s + st ** 2 * s * c
    s_tt = sx ** 2 * s * s + st ** 2 * c * c
    return s_xt / s_tt


def test_tilted_gaussian_moves_at_the_implied_velocity() -> None:
    theta, sx, st = 0.6, 0.3, 0.05
    g = _tilted(theta, sx, st)
    Rm = rotation_4d(g.quats_l, g.quats_r)[0]
    s, c = math.sin(theta), math.cos(theta)
    torch.testing.assert_close(Rm[:, 0], torch.tensor([c, 0.0, 0.0, -s], dtype=torch.float64))  # x axis
    torch.testing.assert_close(Rm[:, 3], torch.tensor([s, 0.0, 0.0, c], dtype=torch.float64))  # t axis
    v_expect = _velocity(theta, sx, st)
    t = torch.tensor([0.2, 0.4, 0.5, 0.9], dtype=torch.float64)
    means, covs, _ = g.slice(t)
    vel = (means[1:, 0] - means[:-1, 0]) / (t[1:] - t[:-1])[:, None]  # [3, 3]
    torch.testing.assert_close(vel[:, 0], torch.full((3,), v_expect, dtype=torch.float64))
    torch.testing.assert_close(vel[:, 1:], torch.zeros(3, 2, dtype=torch.float64))
    assert abs(v_expect) > 0.5
    # independent form: conditional of a Gaussian via its precision matrix P = Sigma^-1
    P = torch.linalg.inv(g.covariance()[0])
    cond_cov = torch.linalg.inv(P[:3, :3])
    for i, ti in enumerate(t.tolist()):
        mu = g.means[0, :3].detach() - cond_cov @ P[:3, 3] * (ti - 0.4)
        torch.testing.assert_close(means[i, 0], mu)
        torch.testing.assert_close(covs[i, 0], cond_cov)


def test_tilted_gaussian_renders_moving() -> None:
    theta, sx, st = 0.6, 0.3, 0.05
    g = _tilted(theta, sx, st, mean=(0.0, 0.0, 0.0, 0.5))
    vm, K = orbit_cameras([90.0], OrbitSpec(), 32, 32)  # camera on +y looking at the origin: image u = world -x
    t = torch.tensor([0.45, 0.55], dtype=torch.float64)
    img, alpha = g.render(t, vm.double()[None].expand(2, -1, -1, -1), K.double()[None].expand(2, -1, -1, -1),
                          32, 32, backend="torch")
    a = alpha[:, 0, ..., 0]  # [2, H, W]
    u = torch.arange(32, dtype=torch.float64) + 0.5
    cu = (a.sum(1) * u).sum(-1) / a.sum((1, 2))  # alpha-weighted column centroid
    assert a.sum() > 1.0
    px_per_unit = K[0, 0, 0].item() / 2.0  # focal / distance
    expect = -_velocity(theta, sx, st) * 0.1 * px_per_unit
    assert abs(expect) > 2.0
    assert abs((cu[1] - cu[0]).item() - expect) < 0.15 * abs(expect)


def test_sh_colours_and_time_basis() -> None:
    g = init_random(5, sh_degree=2, time_basis=2, color=torch.full((5, 3), 0.5))
    t = torch.tensor([0.0, 1.0])
    means, _, _ = g.slice(t)
    cams = torch.tensor([[[2.0, 0, 0]], [[0, 2.0, 0]]])
    col = g.colors(t, means, cams)
    assert col.shape == (2, 1, 5, 3)
    torch.testing.assert_close(col, torch.full_like(col, 0.5), atol=1e-5, rtol=0)
    with torch.no_grad():
        g.time_coefs[:, 0] = 1.0  # cos(pi t): +1 at t=0, -1 at t=1
    col = g.colors(t, means, cams)
    torch.testing.assert_close(col[0] - col[1], torch.full_like(col[0], 2 * 0.28209479177387814), atol=1e-5, rtol=0)
    # degree-1 band: colour changes with the viewing direction
    d = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    coeffs = torch.zeros(4, 4, 3)
    coeffs[:, 0] = rgb_to_sh_dc(torch.tensor(0.5))
    coeffs[:, 3] = 1.0  # -C1 * x
    torch.testing.assert_close(eval_sh(1, coeffs, d), -0.4886025119029199 * d[:, :1].expand(4, 3))


def test_state_round_trip() -> None:
    g = init_random(7, sh_degree=1, time_basis=3)
    h = Gaussians4D.from_state(g.export_state())
    for k, v in g.state_dict().items():
        torch.testing.assert_close(h.state_dict()[k], v)
    assert h.sh_degree == 1 and h.time_basis == 3


def test_init_from_images_carves_the_object() -> None:
    # a white image matrix with a dark square in the middle of every view: a blob at the origin
    v, f, s = 4, 3, 32
    images = torch.ones(v, f, 3, s, s)
    images[:, :, :, 12:20, 12:20] = torch.tensor([0.2, 0.4, 0.6])[:, None, None]
    vm, K = orbit_cameras(orbit_azimuths(v), OrbitSpec(), s, s)
    g = init_from_images(images, vm, K, torch.tensor(frame_times(f)), 500, generator=torch.Generator().manual_seed(0))
    assert g.num == 500
    assert g.means[:, :3].abs().max() < 0.2  # the square spans about +-0.16 world units at the origin
    rgb = g.sh_dc * 0.28209479177387814 + 0.5
    torch.testing.assert_close(rgb.mean(0), torch.tensor([0.2, 0.4, 0.6]), atol=0.02, rtol=0)
