"""The dense PyTorch rasterizer against an independent slow float64 reference, and its gradients."""

from __future__ import annotations

import math

import pytest
import torch

from d2.stages.cameras import OrbitSpec, orbit_cameras
from d2.stages.render import project, rasterize, resolve_backend


def _random_scene(n: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * 1.2
    A = torch.randn(n, 3, 3, generator=g, dtype=dtype) * 0.06
    covars = A @ A.transpose(-1, -2) + 1e-4 * torch.eye(3, dtype=dtype)
    opac = torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.05
    colors = torch.rand(n, 3, generator=g, dtype=dtype)
    return means, covars, opac, colors


def _reference(means, covars, opac, colors, viewmat, K, width, height, background, eps2d=0.3, near=0.01):
    """Per-pixel loops in float64 written from the EWA splatting formulas (no code shared with render.py)."""
    means, covars, opac, colors = (x.double() for x in (means, covars, opac, colors))
    viewmat, K = viewmat.double(), K.double()
    fx, fy, cx, cy = K[0, 0].item(), K[1, 1].item(), K[0, 2].item(), K[1, 2].item()
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    proj = []
    for i in range(means.shape[0]):
        p = R @ means[i] + t
        x, y, z = p.tolist()
        if z < near:
            continue
        # Jacobian of (fx x/z + cx, fy y/z + cy), with x/z and y/z clamped to 1.3x the view frustum
        limx = 0.5 * width / fx
        limy = 0.5 * height / fy
        u = min((width - cx) / fx + 0.3 * limx, max(-(cx / fx + 0.3 * limx), x / z))
        v = min((height - cy) / fy + 0.3 * limy, max(-(cy / fy + 0.3 * limy), y / z))
        J = torch.tensor([[fx / z, 0.0, -fx * u / z], [0.0, fy / z, -fy * v / z]], dtype=torch.float64)
        S = J @ (R @ covars[i] @ R.T) @ J.T + eps2d * torch.eye(2, dtype=torch.float64)
        if torch.det(S) <= 0:
            continue
        proj.append((z, fx * x / z + cx, fy * y / z + cy, torch.linalg.inv(S), opac[i].item(), colors[i]))
    proj.sort(key=lambda e: e[0])
    img = torch.zeros(height, width, 3, dtype=torch.float64)
    alpha_img = torch.zeros(height, width, 1, dtype=torch.float64)
    for py in range(height):
        for px in range(width):
            T = 1.0
            acc = torch.zeros(3, dtype=torch.float64)
            for _, mx, my, Sinv, o, col in proj:
                d = torch.tensor([px + 0.5 - mx, py + 0.5 - my], dtype=torch.float64)
                q = 0.5 * float(d @ Sinv @ d)
                a = min(0.999, o * math.exp(-q))
                if q < 0 or a < 1.0 / 255.0:
                    continue
                if T * (1 - a) <= 1e-4:
                    break
                acc = acc + T * a * col
                T = T * (1 - a)
            img[py, px] = acc + T * background
            alpha_img[py, px, 0] = 1 - T
    return img, alpha_img


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_slow_reference(seed: int) -> None:
    n, w, h = 40, 20, 16  # non-square, not a multiple of the tile size
    means, covars, opac, colors = _random_scene(n, seed)
    vm, K = orbit_cameras([30.0 + 70 * seed, 200.0], OrbitSpec(radius=2.0, fov_deg=40.0, elevation_deg=15.0), w, h)
    vm, K = vm.double(), K.double()
    bg = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    out, alpha = rasterize(means, covars, opac, colors, vm, K, w, h, background=bg, backend="torch", torch_tile_size=6)
    assert out.shape == (2, h, w, 3) and alpha.shape == (2, h, w, 1)
    for ci in range(2):
        ref, ref_a = _reference(means, covars, opac, colors, vm[ci], K[ci], w, h, bg)
        assert (alpha[ci] > 0.05).float().mean() > 0.2  # the scene actually covers the image
        torch.testing.assert_close(out[ci], ref, atol=1e-9, rtol=0)
        torch.testing.assert_close(alpha[ci], ref_a, atol=1e-9, rtol=0)


def test_saturation_and_near_plane_culling() -> None:
    # many opaque layers: the transmittance cut-off must kick in exactly as in the reference
    n, w, h = 30, 12, 12
    g = torch.Generator().manual_seed(3)
    means = torch.randn(n, 3, generator=g, dtype=torch.float64) * 0.05
    means[:5, 0] = 1.995  # in front of the near plane of the camera at azimuth 0, radius 2 (z < 0.01)
    covars = torch.eye(3, dtype=torch.float64).expand(n, 3, 3) * 0.02
    opac = torch.full((n,), 0.97, dtype=torch.float64)
    opac[::2] = 0.9995  # above gsplat's alpha clamp of 0.999
    means[6] = torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)  # a wide, nearly opaque one in front
    covars = covars.clone()
    covars[6] = torch.eye(3, dtype=torch.float64) * 0.5
    colors = torch.rand(n, 3, generator=g, dtype=torch.float64)
    vm, K = orbit_cameras([0.0], OrbitSpec(), w, h)
    vm, K = vm.double(), K.double()
    bg = torch.ones(3, dtype=torch.float64)
    out, alpha = rasterize(means, covars, opac, colors, vm, K, w, h, background=bg, backend="torch")
    ref, ref_a = _reference(means, covars, opac, colors, vm[0], K[0], w, h, bg)
    assert alpha.max() > 0.999  # saturated
    torch.testing.assert_close(out[0], ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(alpha[0], ref_a, atol=1e-9, rtol=0)


def test_batch_dims_and_chunking_agree() -> None:
    # [2 times, N] Gaussians seen by [2 times, 3 cameras]; tiny max_elements forces many groups
    means, covars, opac, colors = _random_scene(50, 5, dtype=torch.float32)
    vm, K = orbit_cameras([10.0, 130.0, 250.0], OrbitSpec(), 24, 24)
    bm = torch.stack([means, means + 0.1])
    bc, bo, bcol = covars.expand(2, -1, -1, -1), opac.expand(2, -1), colors.expand(2, -1, -1)
    bv, bk = vm.expand(2, -1, -1, -1), K.expand(2, -1, -1, -1)
    big, big_a = rasterize(bm, bc, bo, bcol, bv, bk, 24, 24, backend="torch")
    small, small_a = rasterize(bm, bc, bo, bcol, bv, bk, 24, 24, backend="torch", max_elements=1000)
    assert big.shape == (2, 3, 24, 24, 3)
    torch.testing.assert_close(big, small)
    torch.testing.assert_close(big_a, small_a)
    one, _ = rasterize(bm[1], bc[1], bo[1], bcol[1], bv[1], bk[1], 24, 24, backend="torch")
    torch.testing.assert_close(big[1], one)
    # per-camera colours equal to the shared colours give the same image
    pc, _ = rasterize(bm, bc, bo, bcol.unsqueeze(1).expand(2, 3, -1, -1), bv, bk, 24, 24, backend="torch")
    torch.testing.assert_close(pc, big)


def test_gradients_match_finite_differences() -> None:
    n, w, h = 6, 10, 10
    g = torch.Generator().manual_seed(7)
    means = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * 0.4
    A = torch.randn(n, 3, 3, generator=g, dtype=torch.float64) * 0.1
    base_cov = A @ A.transpose(-1, -2) + 0.01 * torch.eye(3, dtype=torch.float64)
    opac = torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 0.3
    colors = torch.rand(n, 3, generator=g, dtype=torch.float64)
    vm, K = orbit_cameras([20.0], OrbitSpec(fov_deg=30.0), w, h)
    vm, K = vm.double(), K.double()
    weights = torch.rand(1, h, w, 3, generator=g, dtype=torch.float64)

    def loss(m, L, o, c):
        cov = L @ L.transpose(-1, -2)
        img, a = rasterize(m, cov, o, c, vm, K, w, h, background=torch.ones(3, dtype=torch.float64),
                           backend="torch")
        return (img * weights).sum() + a.sum()

    L0 = torch.linalg.cholesky(base_cov)
    inputs = tuple(x.clone().requires_grad_(True) for x in (means, L0, opac, colors))
    # gradcheck perturbs every input element by +-1e-6 and compares with autograd
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_bad_input_and_backend_choice() -> None:
    means, covars, opac, colors = _random_scene(5, 0, dtype=torch.float32)
    vm, K = orbit_cameras([0.0], OrbitSpec(), 8, 8)
    with pytest.raises(ValueError, match="covars"):
        rasterize(means, covars[:, :2], opac, colors, vm, K, 8, 8)
    with pytest.raises(ValueError, match="colors"):
        rasterize(means, covars, opac, colors[:3], vm, K, 8, 8)
    with pytest.raises(ValueError, match="CUDA"):
        rasterize(means, covars, opac, colors, vm, K, 8, 8, backend="gsplat")
    assert resolve_backend("auto", "cpu") == "torch"


def test_gradients_match_finite_differences_when_saturated() -> None:
    # nearly opaque layers: the transmittance cut-off and the suffix terms of the backward matter
    n, w, h = 8, 8, 8
    g = torch.Generator().manual_seed(11)
    means = torch.randn(n, 3, generator=g, dtype=torch.float64) * 0.03
    means[:, 0] += torch.linspace(0.3, -0.3, n, dtype=torch.float64)  # distinct depths from azimuth 0
    L0 = torch.eye(3, dtype=torch.float64).expand(n, 3, 3) * 0.12 + torch.randn(n, 3, 3, generator=g,
                                                                                    dtype=torch.float64) * 0.01
    opac = torch.rand(n, generator=g, dtype=torch.float64) * 0.1 + 0.85
    colors = torch.rand(n, 3, generator=g, dtype=torch.float64)
    L0 = L0.clone()
    L0[0] = torch.eye(3, dtype=torch.float64) * 4.0  # very wide: above the 0.999 clamp near its centre
    opac[0] = 0.9995  # the front one
    vm, K = orbit_cameras([0.0], OrbitSpec(fov_deg=30.0), w, h)
    vm, K = vm.double(), K.double()
    weights = torch.rand(1, h, w, 3, generator=g, dtype=torch.float64)

    def loss(m, L, o, c):
        img, a = rasterize(m, L @ L.transpose(-1, -2), o, c, vm, K, w, h, backend="torch")
        return (img * weights).sum() + 0.5 * a.sum()

    with torch.no_grad():
        _, a = rasterize(means, L0 @ L0.transpose(-1, -2), opac, colors, vm, K, w, h, backend="torch")
    assert a.max() > 0.999  # saturated pixels exist
    m2, con, _, _, _ = project(means, L0 @ L0.transpose(-1, -2), vm, K, w, h)
    d = m2[0, 0] - 0.5 - torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), -1)
    sig = 0.5 * (con[0, 0, 0] * d[..., 0] ** 2 + con[0, 0, 2] * d[..., 1] ** 2) + con[0, 0, 1] * d[..., 0] * d[..., 1]
    assert (opac[0] * torch.exp(-sig) > 0.999).any() and (opac[0] * torch.exp(-sig) < 0.999).any()
    inputs = tuple(x.clone().requires_grad_(True) for x in (means, L0, opac, colors))
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
