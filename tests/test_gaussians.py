"""4D Gaussians: rotations, slicing (against the precision-matrix form), colours, initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from d2.stages.cameras import OrbitSpec, frame_times, orbit_azimuths, orbit_cameras
from d2.stages.gaussians import (
    Gaussians4D,
    eval_sh,
    from_reference_layout,
    init_from_images,
    init_random,
    load_reference_checkpoint,
    reference_params_from_checkpoint,
    rgb_to_sh_dc,
    rotation_4d,
    save_reference_init,
    to_reference_layout,
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


def _ref_colour_4d(feats: torch.Tensor, d: torch.Tensor, dir_t: torch.Tensor, period: float) -> torch.Tensor:
    """4DGS's degree-3 colour with two time terms, written out band by band: feats [N, 48, 3]
    (index 16 k + j: band j, time term k), unit directions [N, 3], dir_t = mu_t - t [N]."""
    x, y, z = d[:, 0:1], d[:, 1:2], d[:, 2:3]
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    c0, c1 = 0.28209479177387814, 0.4886025119029199
    c2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
    c3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
          1.445305721320277, -0.5900435899266435)
    ys = [c0 * torch.ones_like(x), -c1 * y, c1 * z, -c1 * x, c2[0] * xy, c2[1] * yz, c2[2] * (2 * zz - xx - yy),
          c2[3] * xz, c2[4] * (xx - yy), c3[0] * y * (3 * xx - yy), c3[1] * xy * z, c3[2] * y * (4 * zz - xx - yy),
          c3[3] * z * (2 * zz - 3 * xx - 3 * yy), c3[4] * x * (4 * zz - xx - yy), c3[5] * z * (xx - yy),
          c3[6] * x * (xx - 3 * yy)]
    out = sum(ys[j] * feats[:, j] for j in range(16))
    t1 = torch.cos(2 * math.pi * dir_t / period)[:, None]
    t2 = torch.cos(2 * math.pi * 2 * dir_t / period)[:, None]
    out = out + t1 * sum(ys[j] * feats[:, 16 + j] for j in range(16))
    out = out + t2 * sum(ys[j] * feats[:, 32 + j] for j in range(16))
    return torch.clamp(out + 0.5, min=0.0)


def test_colour_over_time_matches_the_4dgs_formula() -> None:
    """Every band varies with cos(2 pi k (mu_t - t) / T), relative to each Gaussian's time."""
    gen = torch.Generator().manual_seed(3)
    n, period = 6, 1.3
    g = init_random(n, sh_degree=3, time_basis=2, generator=gen)
    g.time_period = period
    feats = torch.randn(n, 48, 3, generator=gen, dtype=torch.float64) * 0.3
    with torch.no_grad():
        g.double()
        g.means[:, 3] = torch.tensor([-0.1, 0.0, 0.3, 0.5, 0.9, 1.1], dtype=torch.float64)
        g.sh_dc.copy_(feats[:, 0])
        g.sh_rest.copy_(feats[:, 1:16])
        g.time_coefs.copy_(feats[:, 16:].reshape(n, 2, 16, 3))
    cam = torch.tensor([[[2.0, 0.5, -0.3]]], dtype=torch.float64)
    for t in (0.0, 0.37, 1.0):
        tt = torch.tensor([t], dtype=torch.float64)
        means, _, _ = g.slice(tt)
        col = g.colors(tt, means, cam)[0, 0]  # [N, 3]
        d = torch.nn.functional.normalize(means[0] - cam[0, 0], dim=-1)
        torch.testing.assert_close(col, _ref_colour_4d(feats, d, g.means[:, 3].detach() - t, period))
    # the time term follows the Gaussian: two Gaussians shifted in time by the same amount as the
    # query give the same colour
    with torch.no_grad():
        g.sh_rest.zero_()
        g.time_coefs.zero_()
        g.time_coefs[:, 0, 0] = 1.0
        g.sh_dc.zero_()
    c = g.sh_at(torch.tensor([0.0, 0.25], dtype=torch.float64))[:, :, 0, 0]  # [2, N] DC at two times
    expect = torch.cos(2 * math.pi * (g.means[:, 3].detach()[None] - torch.tensor([[0.0], [0.25]],
                                                                                dtype=torch.float64)) / period)
    torch.testing.assert_close(c, expect)
    # degree-1 band: colour changes with the viewing direction
    d = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    coeffs = torch.zeros(4, 4, 3)
    coeffs[:, 0] = rgb_to_sh_dc(torch.tensor(0.5))
    coeffs[:, 3] = 1.0  # -C1 * x
    torch.testing.assert_close(eval_sh(1, coeffs, d), -0.4886025119029199 * d[:, :1].expand(4, 3))


def test_active_bands_leave_the_others_out() -> None:
    g = init_random(4, sh_degree=2, time_basis=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        g.sh_rest.fill_(0.7)
        g.time_coefs.fill_(0.4)
    t = torch.tensor([0.2])
    means, _, _ = g.slice(t)
    cams = torch.tensor([[[2.0, 0.0, 0.0]]])
    g.active_sh_degree, g.active_time_basis = 0, 0
    base = g.colors(t, means, cams)
    torch.testing.assert_close(base, (g.sh_dc * 0.28209479177387814 + 0.5).clamp(min=0)[None, None].detach())
    g.active_sh_degree, g.active_time_basis = 2, 2
    assert (g.colors(t, means, cams) - base).abs().max() > 0.05


def _ref_rotation(ql: torch.Tensor, qr: torch.Tensor) -> torch.Tensor:
    """4DGS's 4D rotation, re-derived: flip(M_l(q_l) M_r(q_r)) with its two 4 x 4 matrices."""
    ql = ql / ql.norm(dim=-1, keepdim=True)
    qr = qr / qr.norm(dim=-1, keepdim=True)
    a, b, c, d = ql.unbind(-1)
    p, q, r, s = qr.unbind(-1)
    ml = torch.stack([a, -b, -c, -d, b, a, -d, c, c, d, a, -b, d, -c, b, a], -1).reshape(-1, 4, 4)
    mr = torch.stack([p, q, r, s, -q, p, -s, r, -r, s, p, -q, -s, -r, q, p], -1).reshape(-1, 4, 4)
    return (ml @ mr).flip(1, 2)


def test_reference_layout_round_trip_and_same_geometry() -> None:
    gen = torch.Generator().manual_seed(5)
    g = init_random(9, sh_degree=3, time_basis=2, generator=gen)
    with torch.no_grad():
        for name in ("quats_l", "quats_r", "sh_rest", "time_coefs", "log_scales"):
            getattr(g, name).copy_(torch.randn(getattr(g, name).shape, generator=gen) * 0.5)
    ref = to_reference_layout(g, time_start=0.0)
    assert ref["features_dc"].shape == (9, 3, 1) and ref["features_rest"].shape == (9, 3, 47)
    # the reference's rotation of its quaternions equals ours
    torch.testing.assert_close(_ref_rotation(ref["rotation"].double(), ref["rotation_r"].double()),
                               rotation_4d(g.quats_l.double(), g.quats_r.double()))
    # its covariance L L^T with L = R diag(s) and its colour index layout
    s = torch.exp(torch.cat([ref["scaling"], ref["scaling_t"]], 1)).double()
    L = _ref_rotation(ref["rotation"].double(), ref["rotation_r"].double()) * s[:, None, :]
    torch.testing.assert_close(L @ L.transpose(1, 2), g.covariance().double(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ref["features_rest"].transpose(1, 2)[:, 16 * 2 + 3 - 1], g.time_coefs[:, 1, 3].detach())
    back = from_reference_layout(reference_params_from_checkpoint(ref), 3, 2, temporal_cutoff=0.0)
    for k, v in g.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    # a reference training checkpoint: (capture tuple, iteration) with the capture layout [N, M, 3]
    cap = [None] * 19
    cap[1], cap[2], cap[3] = ref["xyz"], ref["features_dc"].transpose(1, 2), ref["features_rest"].transpose(1, 2)
    cap[4], cap[5], cap[6] = ref["scaling"], ref["rotation"], ref["opacity"]
    cap[13], cap[14], cap[15], cap[16] = ref["t"], ref["scaling_t"], ref["rotation_r"], True
    back2 = from_reference_layout(reference_params_from_checkpoint((tuple(cap), 5000)), 3, 2)
    torch.testing.assert_close(back2.covariance(), g.covariance())
    assert back2.temporal_cutoff == 0.05


def test_reference_files_round_trip(tmp_path) -> None:
    g = init_random(5, sh_degree=3, time_basis=2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        g.time_coefs.normal_(generator=torch.Generator().manual_seed(3))
    save_reference_init(g, tmp_path / "init.pth", time_start=0.5)
    back = load_reference_checkpoint(tmp_path / "init.pth", time_start=0.5)
    for k, v in g.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    assert back.sh_degree == 3 and back.time_basis == 2
    with pytest.raises(ValueError, match="needs 16"):
        load_reference_checkpoint(tmp_path / "init.pth", sh_degree=3, time_basis=0)


def test_temporal_cutoff_skips_faint_gaussians() -> None:
    g = init_random(3, time_scale=0.1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        g.means[:, 3] = torch.tensor([0.5, 0.5 + 0.1 * math.sqrt(2 * math.log(1 / 0.04)),
                                      0.5 + 0.1 * math.sqrt(2 * math.log(1 / 0.06))])
    _, _, full = g.slice(torch.tensor([0.5]))
    g.temporal_cutoff = 0.05
    _, _, cut = g.slice(torch.tensor([0.5]))
    assert (full > 0).all()
    torch.testing.assert_close(cut[0], torch.stack([full[0, 0], torch.tensor(0.0), full[0, 2]]))


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


def _moving_gaussians(n: int = 5) -> Gaussians4D:
    """Degree-1 colours on Gaussians tilted in space-time (their slice moves with t)."""
    gen = torch.Generator().manual_seed(4)
    g = init_random(n, sh_degree=1, time_basis=1, generator=gen)
    with torch.no_grad():
        g.double()
        g.log_scales.copy_(torch.log(torch.tensor([0.1, 0.1, 0.1, 0.6], dtype=torch.float64)).expand(n, 4))
        g.quats_l.copy_(torch.randn(n, 4, generator=gen, dtype=torch.float64))
        g.quats_r.copy_(torch.randn(n, 4, generator=gen, dtype=torch.float64))
        g.sh_rest.copy_(torch.randn(n, 3, 3, generator=gen, dtype=torch.float64))
        g.time_coefs.copy_(torch.randn(n, 1, 4, 3, generator=gen, dtype=torch.float64) * 0.2)
    return g


def test_view_direction_of_the_colour_starts_from_the_unsliced_mean() -> None:
    """4DGS's CUDA rasterizer (computeColorFromSH_4D) takes the view direction from the 4D mean's
    xyz, not from the sliced mean, and its backward sends the direction's gradient on through the
    slice (it is added to the sliced mean's gradient). sh_direction='sliced' keeps mu(t)."""
    g = _moving_gaussians()
    cam = torch.tensor([[[0.9, 0.4, -0.5]]], dtype=torch.float64)  # close: directions differ visibly
    t = torch.tensor([0.9], dtype=torch.float64)
    means_t, _, _ = g.slice(t)
    assert (means_t[0] - g.means[:, :3]).norm(dim=-1).min() > 0.02  # every Gaussian moved

    def formula(pos: torch.Tensor) -> torch.Tensor:
        coeffs = g.sh_at(t)[0]  # [N, 4, 3]
        d = torch.nn.functional.normalize(pos - cam[0, 0], dim=-1)
        return torch.clamp(eval_sh(1, coeffs, d) + 0.5, min=0.0)

    assert g.sh_direction == "unsliced"
    unsliced = g.colors(t, means_t, cam)[0, 0]
    torch.testing.assert_close(unsliced, formula(g.means[:, :3]))
    g.sh_direction = "sliced"
    sliced = g.colors(t, means_t, cam)[0, 0]
    torch.testing.assert_close(sliced, formula(means_t[0]))
    assert (unsliced - sliced).abs().max() > 0.05
    # gradient: J (the colour's derivative in the position, at xyz) times d mu(t) / d parameters
    g.sh_direction = "unsliced"
    w = torch.randn(unsliced.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = [g.means, g.quats_l, g.log_scales]
    got = torch.autograd.grad((g.colors(t, g.slice(t)[0], cam)[0, 0] * w).sum(), params)
    pos = g.means[:, :3].detach().clone().requires_grad_(True)
    (jac,) = torch.autograd.grad((formula(pos) * w).sum(), [pos])
    via_slice = torch.autograd.grad(g.slice(t)[0][0], params, grad_outputs=jac)
    for a, b in zip(got, via_slice):
        torch.testing.assert_close(a, b)
    assert via_slice[1].abs().max() > 1e-6  # it reaches the space-time rotation


def test_view_direction_setting_travels_with_the_state() -> None:
    g = _moving_gaussians(3)
    assert Gaussians4D.from_state(g.export_state()).sh_direction == "unsliced"
    g.sh_direction = "sliced"
    assert Gaussians4D.from_state(g.export_state()).sh_direction == "sliced"
    old = g.export_state()
    del old["sh_direction"]  # states without the key were fitted with the direction from mu(t)
    assert Gaussians4D.from_state(old).sh_direction == "sliced"
    with pytest.raises(ValueError, match="sh_direction"):
        Gaussians4D(2, sh_direction="sideways")
