"""Native 4D Gaussians (the 4DGS of Yang et al., the Diffusion² authors' group).

Each Gaussian lives in space-time (x, y, z, t): a 4D mean, four scales and a 4D rotation
``R = L(q_l) R(q_r)`` made of a left and a right isoclinic rotation (two unit quaternions),
so its covariance is ``Sigma = R diag(s)^2 R^T`` (4 x 4). Slicing at time ``t`` gives the
3D Gaussian of the conditional distribution, weighted by the temporal marginal:

    mu(t)    = mu_xyz + S_xt / S_tt * (t - mu_t)
    S3(t)    = S_xx - S_xt S_xt^T / S_tt
    alpha(t) = sigmoid(o) * exp(-(t - mu_t)^2 / (2 S_tt))

and, as the 4DGS rasterizer does, a Gaussian whose temporal marginal
``exp(-(t - mu_t)^2 / (2 S_tt))`` is at or below ``temporal_cutoff`` is skipped at that time.

Colour: 4D spherindrical harmonics as 4DGS evaluates them. Every real spherical-harmonics
band of the viewing direction (degree ``sh_degree``) carries ``time_basis`` extra
coefficient sets multiplying ``cos(2 pi k (mu_t - t) / time_period)``, k = 1..time_basis,
with ``mu_t`` the Gaussian's own time (held constant in the colour's gradient, as the
reference's Python colour path does; its CUDA backward passes part of it to ``mu_t``):

    c(d, t) = sum_j Y_j(d) (f_j + sum_k cos(2 pi k (mu_t - t) / T) f_{k, j})

The viewing direction ``d`` starts from the 4D mean's own ``xyz`` (``sh_direction =
"unsliced"``), as 4DGS's CUDA rasterizer computes it (``computeColorFromSH_4D`` reads the
unsliced points); its backward adds the direction's gradient to the sliced mean's, so that
gradient also reaches the slice's offset ``S_xt / S_tt (t - mu_t)``. ``"sliced"`` starts it
from ``mu(t)`` instead (4DGS's Python colour path). RGB = max(c + 0.5, 0) as in 3DGS.

Times are in [0, 1] (frame f of F at f / (F - 1), :mod:`d2.stages.cameras`). :func:`to_reference_layout` / :func:`from_reference_layout`
convert to and from the 4DGS code's parameter layout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from d2.stages.render import Backend, rasterize

# real SH constants (as in the 3DGS reference code)
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
         1.445305721320277, -0.5900435899266435)

STATE_VERSION = 2  # 2: time basis on every SH band, relative to each Gaussian's time
SH_DIRECTIONS = ("unsliced", "sliced")  # which mean the colour's viewing direction starts from
PARAM_NAMES = ("means", "log_scales", "quats_l", "quats_r", "opacity_logits", "sh_dc", "sh_rest", "time_coefs")


def rgb_to_sh_dc(rgb: Tensor) -> Tensor:
    """DC SH coefficient giving the colour ``rgb`` (any shape [..., 3])."""
    return (rgb - 0.5) / SH_C0


def eval_sh(degree: int, coeffs: Tensor, dirs: Tensor) -> Tensor:
    """Real SH up to ``degree``: coeffs [..., (degree+1)^2, 3], unit dirs [..., 3] -> [..., 3]."""
    if not 0 <= degree <= 3:
        raise ValueError(f"sh_degree must be in 0..3, got {degree}")
    out = SH_C0 * coeffs[..., 0, :]
    if degree == 0:
        return out
    x, y, z = (dirs[..., i:i + 1] for i in range(3))
    out = out - SH_C1 * y * coeffs[..., 1, :] + SH_C1 * z * coeffs[..., 2, :] - SH_C1 * x * coeffs[..., 3, :]
    if degree == 1:
        return out
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    out = (out + SH_C2[0] * xy * coeffs[..., 4, :] + SH_C2[1] * yz * coeffs[..., 5, :]
           + SH_C2[2] * (2.0 * zz - xx - yy) * coeffs[..., 6, :] + SH_C2[3] * xz * coeffs[..., 7, :]
           + SH_C2[4] * (xx - yy) * coeffs[..., 8, :])
    if degree == 2:
        return out
    out = (out + SH_C3[0] * y * (3 * xx - yy) * coeffs[..., 9, :] + SH_C3[1] * xy * z * coeffs[..., 10, :]
           + SH_C3[2] * y * (4 * zz - xx - yy) * coeffs[..., 11, :]
           + SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * coeffs[..., 12, :]
           + SH_C3[4] * x * (4 * zz - xx - yy) * coeffs[..., 13, :] + SH_C3[5] * z * (xx - yy) * coeffs[..., 14, :]
           + SH_C3[6] * x * (xx - 3 * yy) * coeffs[..., 15, :])
    return out


def left_isoclinic(q: Tensor) -> Tensor:
    """Matrix [..., 4, 4] of left multiplication by the unit quaternion q [..., 4] (a, b, c, d)."""
    a, b, c, d = q.unbind(-1)
    return torch.stack([
        torch.stack([a, -b, -c, -d], -1),
        torch.stack([b, a, -d, c], -1),
        torch.stack([c, d, a, -b], -1),
        torch.stack([d, -c, b, a], -1),
    ], -2)


def right_isoclinic(q: Tensor) -> Tensor:
    """Matrix [..., 4, 4] of right multiplication by the unit quaternion q [..., 4] (p, q, r, s)."""
    p, qq, r, s = q.unbind(-1)
    return torch.stack([
        torch.stack([p, -qq, -r, -s], -1),
        torch.stack([qq, p, s, -r], -1),
        torch.stack([r, -s, p, qq], -1),
        torch.stack([s, r, -qq, p], -1),
    ], -2)


_TXYZ_TO_XYZT = [1, 2, 3, 0]


def rotation_4d(quats_l: Tensor, quats_r: Tensor) -> Tensor:
    """4D rotation [..., 4, 4] in (x, y, z, t) coordinates from two quaternions [..., 4] (normalised here).

    The isoclinic matrices act on 4-vectors read as quaternions (t, x, y, z), time being
    the real part; so ``q_r = conj(q_l)`` gives ``v -> q v q^-1``, a pure spatial rotation
    (3DGS's quaternion), and space-time tilts come from ``q_r != conj(q_l)``.
    """
    ql = quats_l / quats_l.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    qr = quats_r / quats_r.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    R = left_isoclinic(ql) @ right_isoclinic(qr)  # in (t, x, y, z)
    return R[..., _TXYZ_TO_XYZT, :][..., :, _TXYZ_TO_XYZT]


def covariance_4d(log_scales: Tensor, quats_l: Tensor, quats_r: Tensor) -> Tensor:
    """Sigma = R diag(exp(2 log_scales)) R^T: [..., 4] scales, [..., 4] quaternions -> [..., 4, 4]."""
    R = rotation_4d(quats_l, quats_r)
    M = R * torch.exp(log_scales).unsqueeze(-2)  # R @ diag(s)
    return M @ M.transpose(-1, -2)


def slice_covariance(
    means4: Tensor,  # [N, 4]
    cov4: Tensor,  # [N, 4, 4]
    opacities: Tensor,  # [N] (after sigmoid)
    t: Tensor,  # [T]
) -> tuple[Tensor, Tensor, Tensor]:
    """Condition 4D Gaussians on time: ([T, N, 3] means, [T, N, 3, 3] covariances, [T, N] opacities)."""
    s_xx = cov4[:, :3, :3]  # [N, 3, 3]
    s_xt = cov4[:, :3, 3]  # [N, 3]
    s_tt = cov4[:, 3, 3].clamp(min=1e-12)  # [N]
    dt = t[:, None] - means4[None, :, 3]  # [T, N]
    means = means4[None, :, :3] + (s_xt / s_tt[:, None])[None] * dt[..., None]  # [T, N, 3]
    cov3 = s_xx - s_xt[:, :, None] * s_xt[:, None, :] / s_tt[:, None, None]  # [N, 3, 3]
    cov3 = 0.5 * (cov3 + cov3.transpose(-1, -2))
    opac = opacities[None] * torch.exp(-0.5 * dt * dt / s_tt[None])  # [T, N]
    return means, cov3.unsqueeze(0).expand(t.shape[0], -1, -1, -1), opac


def camera_centers(viewmats: Tensor) -> Tensor:
    """World positions [..., 3] of cameras given world-to-camera matrices [..., 4, 4]."""
    R = viewmats[..., :3, :3]
    return -(R.transpose(-1, -2) @ viewmats[..., :3, 3:4]).squeeze(-1)


class Gaussians4D(nn.Module):
    """A set of N native 4D Gaussians (parameters as ``nn.Parameter``; see the module docstring)."""

    def __init__(self, n: int, sh_degree: int = 1, time_basis: int = 2, dtype: torch.dtype = torch.float32,
                 time_period: float = 1.0, temporal_cutoff: float = 0.0, sh_direction: str = "unsliced"):
        super().__init__()
        if not 0 <= sh_degree <= 3:
            raise ValueError(f"sh_degree must be in 0..3, got {sh_degree}")
        if time_basis < 0:
            raise ValueError(f"time_basis must be >= 0, got {time_basis}")
        if time_period <= 0:
            raise ValueError(f"time_period must be > 0, got {time_period}")
        if not 0 <= temporal_cutoff < 1:
            raise ValueError(f"temporal_cutoff must be in [0, 1), got {temporal_cutoff}")
        if sh_direction not in SH_DIRECTIONS:
            raise ValueError(f"sh_direction must be one of {SH_DIRECTIONS}, got {sh_direction!r}")
        self.sh_degree = sh_degree
        self.time_basis = time_basis
        self.time_period = float(time_period)  # T of the colour's time basis cos(2 pi k (mu_t - t) / T)
        self.temporal_cutoff = float(temporal_cutoff)  # skip a Gaussian whose temporal marginal is <= this
        self.sh_direction = sh_direction  # the colour's viewing direction from the unsliced xyz or from mu(t)
        # bands in use (training raises them progressively); inactive coefficients get no gradient
        self.active_sh_degree = sh_degree
        self.active_time_basis = time_basis
        k = (sh_degree + 1) ** 2
        ident = torch.zeros(n, 4, dtype=dtype)
        ident[:, 0] = 1.0
        self.means = nn.Parameter(torch.zeros(n, 4, dtype=dtype))  # [N, 4] (x, y, z, t)
        self.log_scales = nn.Parameter(torch.full((n, 4), math.log(0.05), dtype=dtype))  # [N, 4]
        self.quats_l = nn.Parameter(ident.clone())  # [N, 4] left isoclinic quaternion
        self.quats_r = nn.Parameter(ident.clone())  # [N, 4] right isoclinic quaternion
        self.opacity_logits = nn.Parameter(torch.zeros(n, dtype=dtype))  # [N]
        self.sh_dc = nn.Parameter(torch.zeros(n, 3, dtype=dtype))  # [N, 3]
        self.sh_rest = nn.Parameter(torch.zeros(n, k - 1, 3, dtype=dtype))  # [N, K-1, 3]
        self.time_coefs = nn.Parameter(torch.zeros(n, time_basis, k, 3, dtype=dtype))  # [N, B, K, 3]

    @property
    def num(self) -> int:
        """Number of Gaussians N."""
        return self.means.shape[0]

    def covariance(self) -> Tensor:
        """4D covariances [N, 4, 4]."""
        return covariance_4d(self.log_scales, self.quats_l, self.quats_r)

    def slice(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """3D Gaussians at times t [T]: means [T, N, 3], covars [T, N, 3, 3], opacities [T, N]."""
        t = t.to(self.means)
        cov4 = self.covariance()
        means, covs, opac = slice_covariance(self.means, cov4, torch.sigmoid(self.opacity_logits), t)
        if self.temporal_cutoff > 0:
            with torch.no_grad():
                s_tt = cov4[:, 3, 3].detach().clamp(min=1e-12)
                dt = t[:, None] - self.means[None, :, 3].detach()
                shown = torch.exp(-0.5 * dt * dt / s_tt[None]) > self.temporal_cutoff  # [T, N]
            opac = torch.where(shown, opac, torch.zeros_like(opac))
        return means, covs, opac

    def time_basis_at(self, t: Tensor) -> Tensor:
        """cos(2 pi k (mu_t - t) / time_period), k = 1..active_time_basis: [T, N, B_active]."""
        t = t.to(self.means)
        k = torch.arange(1, self.active_time_basis + 1, dtype=t.dtype, device=t.device)
        dt = self.means[:, 3].detach()[None] - t[:, None]  # [T, N]
        return torch.cos(2 * math.pi * dt[..., None] * k / self.time_period)

    def sh_at(self, t: Tensor) -> Tensor:
        """SH coefficients at times t [T]: [T, N, (deg+1)^2, 3] (every band varies in time)."""
        t = t.to(self.means)
        base = torch.cat([self.sh_dc[:, None], self.sh_rest], dim=1)  # [N, K, 3]
        b = self.active_time_basis
        if b == 0:
            return base[None].expand(t.shape[0], -1, -1, -1)
        return base[None] + torch.einsum("tnb,nbkc->tnkc", self.time_basis_at(t), self.time_coefs[:, :b])

    def colors(self, t: Tensor, means_t: Tensor, cam_centers: Tensor) -> Tensor:
        """RGB [T, C, N, 3] seen from cameras at cam_centers [T, C, 3], Gaussians at means_t [T, N, 3]
        (the sliced means; with ``sh_direction = "unsliced"`` the direction starts from the 4D
        means' xyz, its gradient flowing through ``means_t`` as 4DGS's backward sends it)."""
        coeffs = self.sh_at(t)  # [T, N, K, 3]
        deg = min(self.active_sh_degree, self.sh_degree)
        if deg == 0:
            rgb = eval_sh(0, coeffs, means_t)[:, None].expand(-1, cam_centers.shape[1], -1, -1)
        else:
            pos = means_t
            if self.sh_direction == "unsliced":  # value: xyz; gradient: that of the sliced mean
                pos = means_t + (self.means[:, :3].to(means_t) - means_t).detach()
            dirs = pos[:, None] - cam_centers[:, :, None]  # [T, C, N, 3]
            dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp(min=1e-9)
            rgb = eval_sh(deg, coeffs[:, None], dirs)
        return torch.clamp(rgb + 0.5, min=0.0)

    def render(
        self,
        t: Tensor,  # [T]
        viewmats: Tensor,  # [T, C, 4, 4]
        Ks: Tensor,  # [T, C, 3, 3]
        width: int,
        height: int,
        background: Tensor | None = None,  # [3]
        backend: Backend = "auto",
        **kwargs,
    ) -> tuple[Tensor, Tensor]:
        """Render time t[i] from cameras viewmats[i]: colors [T, C, H, W, 3], alphas [T, C, H, W, 1]."""
        if viewmats.dim() != 4 or viewmats.shape[0] != t.shape[0]:
            raise ValueError(f"viewmats must be [T={t.shape[0]}, C, 4, 4], got {tuple(viewmats.shape)}")
        means, covars, opac = self.slice(t)
        cols = self.colors(t, means, camera_centers(viewmats).to(means))
        return rasterize(means, covars, opac, cols, viewmats.to(means), Ks.to(means), width, height,
                         background=background, backend=backend, **kwargs)

    def export_state(self) -> dict:
        """Plain dict (tensors and ints) for torch.save / torch.load(weights_only=True)."""
        return {"version": STATE_VERSION, "sh_degree": self.sh_degree, "time_basis": self.time_basis,
                "time_period": self.time_period, "temporal_cutoff": self.temporal_cutoff,
                "sh_direction": self.sh_direction,
                "params": {k: getattr(self, k).detach().cpu().clone() for k in PARAM_NAMES}}

    @classmethod
    def from_state(cls, state: dict) -> "Gaussians4D":
        """Inverse of :meth:`export_state`."""
        if not isinstance(state, dict) or "params" not in state:
            raise ValueError("not a Gaussians4D state (expected a dict with 'params', 'sh_degree', 'time_basis')")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Gaussians4D state version {state.get('version')} is not {STATE_VERSION} (version 1 "
                             "used an absolute-time colour basis on the DC band only; refit the asset)")
        p = state["params"]
        # states written without the key were fitted with the direction from mu(t)
        g = cls(p["means"].shape[0], int(state["sh_degree"]), int(state["time_basis"]), dtype=p["means"].dtype,
                time_period=float(state["time_period"]), temporal_cutoff=float(state["temporal_cutoff"]),
                sh_direction=str(state.get("sh_direction", "sliced")))
        g.set_params({k: p[k] for k in PARAM_NAMES})
        return g

    def set_params(self, params: dict[str, Tensor]) -> None:
        """Replace every parameter (e.g. after densification) with new tensors of a common N."""
        n = params["means"].shape[0]
        for k in PARAM_NAMES:
            if params[k].shape[0] != n:
                raise ValueError(f"parameter {k} has {params[k].shape[0]} rows, means has {n}")
            setattr(self, k, nn.Parameter(params[k].detach().clone()))


def knn_scales(xyz: Tensor, k: int = 3, chunk: int = 4096) -> Tensor:
    """Initial spatial scale of each point [N, 3] as 3DGS sets it: sqrt of the mean squared
    distance to its ``k`` nearest other points (floored at 1e-7 squared), [N]."""
    n = xyz.shape[0]
    if n <= 1:
        return torch.full((n,), 1e-3, dtype=xyz.dtype)
    kk = min(k, n - 1)
    out = []
    for i in range(0, n, chunk):
        d2 = torch.cdist(xyz[i:i + chunk], xyz).square()  # [c, N]
        d2[torch.arange(d2.shape[0]), torch.arange(i, i + d2.shape[0])] = float("inf")  # not itself
        out.append(torch.topk(d2, kk, dim=-1, largest=False).values.mean(-1))
    return torch.sqrt(torch.cat(out).clamp(min=1e-7))


def init_random(
    n: int,
    extent: float = 0.5,
    sh_degree: int = 1,
    time_basis: int = 2,
    time_scale: float = 0.25,
    color: Tensor | None = None,
    generator: torch.Generator | None = None,
    time_margin: float = 0.0,
    opacity: float = 0.1,
) -> Gaussians4D:
    """N Gaussians uniform in the cube [-extent, extent]^3 x [-time_margin, 1 + time_margin].

    Spatial scale = the mean spacing (volume / N)^(1/3) / 2, temporal scale ``time_scale``, no
    space-time rotation, opacity ``opacity``, colour ``color`` [N, 3] or grey.
    """
    if n < 1:
        raise ValueError(f"number of Gaussians must be >= 1, got {n}")
    if not 0 < opacity < 1:
        raise ValueError(f"initial opacity must be in (0, 1), got {opacity}")
    g = Gaussians4D(n, sh_degree, time_basis)
    xyz = (torch.rand(n, 3, generator=generator) * 2 - 1) * extent
    t = torch.rand(n, 1, generator=generator) * (1 + 2 * time_margin) - time_margin
    spacing = (8 * extent ** 3 / n) ** (1 / 3)
    with torch.no_grad():
        g.means.copy_(torch.cat([xyz, t], 1))
        g.log_scales[:, :3] = math.log(spacing / 2)
        g.log_scales[:, 3] = math.log(time_scale)
        g.opacity_logits.fill_(math.log(opacity / (1 - opacity)))
        if color is not None:
            g.sh_dc.copy_(rgb_to_sh_dc(color.clamp(0.02, 0.98)))
    return g


@torch.no_grad()
def init_from_images(
    images: Tensor,  # [V, F, 3, H, W] in [0, 1]
    viewmats: Tensor,  # [V, 4, 4]
    Ks: Tensor,  # [V, 3, 3]
    times: Tensor,  # [F]
    n: int,
    extent: float = 0.6,
    background: float = 1.0,
    threshold: float = 0.06,
    sh_degree: int = 1,
    time_basis: int = 2,
    time_scale: float = 0.25,
    generator: torch.Generator | None = None,
    time_margin: float = 0.0,
    opacity: float = 0.1,
    scale_init: str = "spacing",
) -> Gaussians4D:
    """Initialise N Gaussians by space carving the image matrix itself (no external point cloud).

    Candidate points uniform in [-extent, extent]^3 x [-time_margin, 1 + time_margin] are kept
    when, at the nearest frame, every view that sees them shows foreground there (a pixel
    farther than ``threshold`` from the background colour); their colour is the mean of those
    pixels. Falls back to uniform points when the images show no foreground at all. Spatial
    scales: ``spacing`` = half the mean spacing of the carved volume, ``knn`` = 3DGS's rule
    (:func:`knn_scales`).
    """
    if scale_init not in ("spacing", "knn"):
        raise ValueError(f"scale_init must be 'spacing' or 'knn', got {scale_init!r}")
    v, f, _, h, w = images.shape
    if viewmats.shape[0] != v or Ks.shape[0] != v or times.shape[0] != f:
        raise ValueError("images [V, F, 3, H, W], viewmats [V, 4, 4], Ks [V, 3, 3], times [F] disagree")
    fg = (images - background).abs().amax(2) > threshold  # [V, F, H, W]
    kept_xyz, kept_t, kept_rgb = [], [], []
    total = 0
    for _ in range(20):  # at most 20 rounds of candidates
        m = max(4 * n, 4096)
        xyz = (torch.rand(m, 3, generator=generator) * 2 - 1) * extent
        t = torch.rand(m, generator=generator) * (1 + 2 * time_margin) - time_margin
        fi = torch.round(t.clamp(0, 1) * (f - 1)).long() if f > 1 else torch.zeros(m, dtype=torch.long)
        cam = torch.einsum("vij,mj->vmi", viewmats[:, :3, :3].float(), xyz) + viewmats[:, None, :3, 3].float()
        z = cam[..., 2].clamp(min=1e-6)  # [V, M]
        u = Ks[:, None, 0, 0] * cam[..., 0] / z + Ks[:, None, 0, 2]
        vv = Ks[:, None, 1, 1] * cam[..., 1] / z + Ks[:, None, 1, 2]
        px, py = u.floor().long(), vv.floor().long()
        inside = (px >= 0) & (px < w) & (py >= 0) & (py < h) & (cam[..., 2] > 0)  # [V, M]
        pxc, pyc = px.clamp(0, w - 1), py.clamp(0, h - 1)
        vid = torch.arange(v)[:, None].expand(v, m)
        fgv = fg[vid, fi[None].expand(v, m), pyc, pxc] | ~inside  # [V, M]
        ok = fgv.all(0) & inside.any(0)
        rgb = images[vid, fi[None].expand(v, m), :, pyc, pxc]  # [V, M, 3]
        wgt = (inside & fg[vid, fi[None].expand(v, m), pyc, pxc]).float()
        rgb = (rgb * wgt[..., None]).sum(0) / wgt.sum(0).clamp(min=1)[..., None]
        kept_xyz.append(xyz[ok])
        kept_t.append(t[ok])
        kept_rgb.append(rgb[ok])
        total += int(ok.sum())
        if total >= n:
            break
    if total == 0:
        return init_random(n, extent, sh_degree, time_basis, time_scale, generator=generator,
                           time_margin=time_margin, opacity=opacity)
    xyz, t, rgb = torch.cat(kept_xyz), torch.cat(kept_t), torch.cat(kept_rgb)
    if total < n:  # repeat with jitter
        idx = torch.randint(0, total, (n,), generator=generator)
        xyz, t, rgb = xyz[idx], t[idx], rgb[idx]
    xyz, t, rgb = xyz[:n], t[:n], rgb[:n]
    g = init_random(n, extent, sh_degree, time_basis, time_scale, color=rgb, generator=generator,
                    time_margin=time_margin, opacity=opacity)
    g.means.copy_(torch.cat([xyz, t[:, None]], 1))
    if scale_init == "knn":
        g.log_scales[:, :3] = torch.log(knn_scales(xyz))[:, None]
    else:
        # spacing from the carved volume: fraction of candidates kept times the cube's volume
        volume = 8 * extent ** 3 * max(total, 1) / max(1, len(kept_xyz) * max(4 * n, 4096))
        spacing = (volume / n) ** (1 / 3)
        g.log_scales[:, :3] = math.log(max(spacing, 1e-3) / 2)
    return g


def procedural_gaussians(n: int = 48, seed: int = 0, spread: float = 0.18, sh_degree: int = 0,
                         time_basis: int = 1) -> Gaussians4D:
    """A known 4D scene (tests, benchmarks): a coloured blob of N Gaussians, a third of them
    tilted in the x-t plane (they move during t in [0, 1]) and every colour pulsing in time."""
    gen = torch.Generator().manual_seed(seed)
    g = Gaussians4D(n, sh_degree=sh_degree, time_basis=time_basis)
    with torch.no_grad():
        g.means[:, :3] = torch.randn(n, 3, generator=gen) * spread
        g.means[:, 3] = 0.5
        g.log_scales[:, :3] = torch.log(torch.rand(n, 3, generator=gen) * spread / 3 + spread / 6)
        g.log_scales[:, 3] = math.log(2.0)
        q = torch.zeros(n, 4)
        q[:, 0] = 1.0
        m = n // 3
        ang = (torch.rand(m, generator=gen) - 0.5) * 0.5
        q[:m, 0] = torch.cos(ang / 2)
        q[:m, 1] = torch.sin(ang / 2)  # q_l = q_r: a rotation in the x-t plane
        g.quats_l.copy_(q)
        g.quats_r.copy_(q)
        g.opacity_logits.fill_(3.0)
        g.sh_dc.copy_(rgb_to_sh_dc(torch.rand(n, 3, generator=gen) * 0.8 + 0.1))
        if time_basis > 0:  # the DC band pulses with cos(2 pi (mu_t - t)) = -cos(2 pi t)
            g.time_coefs[:, 0, 0] = (torch.rand(n, 3, generator=gen) - 0.5) * 0.6
    return g


# The 4DGS code (fudan-zvg/4d-gaussian-splatting) keeps a 4D Gaussian as
#   xyz [N, 3], t [N, 1], scaling [N, 3] and scaling_t [N, 1] (log), rotation and rotation_r [N, 4]
#   (two quaternions, real part first), opacity [N, 1] (logit), features_dc [N, 1, 3] and
#   features_rest [N, M - 1, 3] with M = (deg + 1)^2 (deg_t + 1): coefficient j of time term k
#   (k = 0: no time factor) at index k (deg + 1)^2 + j (its rasterizer evaluates the time terms for
#   degree 3 only). Its rotation is A = flip(M_l(q_l) M_r(q_r)) with M_l the left multiplication by
#   q_l, M_r the right multiplication by conj(q_r) (its quaternion product reads 4-vectors as
#   (t, z, y, x) before the flip of both axes, where ours reads (t, x, y, z)). Relabelling its
#   quaternion components (a, b, c, d) -> (a, d, c, b) (the swap x <-> z, a reflection, which
#   reverses quaternion products) turns v -> q_l v conj(q_r) into ours v -> q_l' v q_r' with
#       q_l' = conj(swap(q_r)),  q_r' = swap(q_l)    (and back: q_l = swap(q_r'), q_r = conj(swap(q_l')))
# so both give the same 4 x 4 rotation of (x, y, z, t), hence the same covariance and slices.

def _swap_xz(q: Tensor) -> Tensor:
    return q[..., [0, 3, 2, 1]]


def _conj(q: Tensor) -> Tensor:
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def to_reference_layout(g: Gaussians4D, time_start: float = 0.0) -> dict[str, Tensor]:
    """Our Gaussians as the dict the 4DGS code's ``loaded_pth`` option reads (``torch.save`` it):
    its parameters with the features stored [N, 3, 1] and [N, 3, M - 1] (it transposes them on
    load); ``t`` is shifted by ``time_start`` (its ``time_duration[0]``; its span must equal our
    ``time_period``)."""
    n, k, b = g.num, (g.sh_degree + 1) ** 2, g.time_basis
    p = {name: getattr(g, name).detach() for name in PARAM_NAMES}
    feats = torch.cat([p["sh_dc"][:, None], p["sh_rest"]], 1)  # [N, K, 3]
    feats = torch.cat([feats, p["time_coefs"].reshape(n, b * k, 3)], 1)  # [N, K (B + 1), 3]
    return {"xyz": p["means"][:, :3].clone(), "t": p["means"][:, 3:4] + time_start,
            "scaling": p["log_scales"][:, :3].clone(), "scaling_t": p["log_scales"][:, 3:4].clone(),
            "rotation": _swap_xz(p["quats_r"]), "rotation_r": _conj(_swap_xz(p["quats_l"])),
            "opacity": p["opacity_logits"][:, None].clone(),
            "features_dc": feats[:, :1].transpose(1, 2).contiguous(),
            "features_rest": feats[:, 1:].transpose(1, 2).contiguous()}


def reference_params_from_checkpoint(obj) -> dict[str, Tensor]:
    """The parameters of a 4DGS checkpoint, features as [N, M', 3]: either a ``loaded_pth`` dict
    (features stored [N, 3, M'] there) or its ``chkpnt*.pth`` (``(capture tuple, iteration)``,
    the 4D capture with ``rot_4d``)."""
    if isinstance(obj, dict):
        d = dict(obj)
        for key in ("features_dc", "features_rest"):
            d[key] = d[key].transpose(1, 2)
        return d
    cap = obj[0] if isinstance(obj, (tuple, list)) and len(obj) == 2 else obj
    if not isinstance(cap, (tuple, list)) or len(cap) != 19:
        raise ValueError("not a 4DGS checkpoint: expected (capture, iteration) with the 19-field 4D capture")
    if not cap[16]:
        raise ValueError("4DGS checkpoint without rot_4d: only the 4D-rotation model converts")
    return {"xyz": cap[1], "features_dc": cap[2], "features_rest": cap[3], "scaling": cap[4], "rotation": cap[5],
            "opacity": cap[6], "t": cap[13], "scaling_t": cap[14], "rotation_r": cap[15]}


def from_reference_layout(params: dict[str, Tensor], sh_degree: int, time_basis: int, time_start: float = 0.0,
                          time_period: float = 1.0, temporal_cutoff: float = 0.05) -> Gaussians4D:
    """Inverse of :func:`to_reference_layout` (``params`` as :func:`reference_params_from_checkpoint`
    returns them); ``sh_degree`` / ``time_basis`` are its ``max_sh_degree`` / ``sh_degree_t``."""
    k = (sh_degree + 1) ** 2
    feats = torch.cat([params["features_dc"], params["features_rest"]], 1).detach().float()  # [N, M, 3]
    n = feats.shape[0]
    if feats.shape[1] != k * (time_basis + 1):
        raise ValueError(f"features hold {feats.shape[1]} coefficients per colour; degree {sh_degree} with "
                         f"{time_basis} time terms needs {k * (time_basis + 1)}")
    g = Gaussians4D(n, sh_degree, time_basis, time_period=time_period, temporal_cutoff=temporal_cutoff)
    g.set_params({
        "means": torch.cat([params["xyz"], params["t"] - time_start], 1).float(),
        "log_scales": torch.cat([params["scaling"], params["scaling_t"]], 1).float(),
        "quats_l": _conj(_swap_xz(params["rotation_r"])).float(), "quats_r": _swap_xz(params["rotation"]).float(),
        "opacity_logits": params["opacity"].reshape(n).float(), "sh_dc": feats[:, 0], "sh_rest": feats[:, 1:k],
        "time_coefs": feats[:, k:].reshape(n, time_basis, k, 3),
    })
    return g


def load_reference_checkpoint(path, sh_degree: int = 3, time_basis: int = 2, time_start: float = 0.0,
                              time_period: float = 1.0) -> Gaussians4D:
    """Our Gaussians from a 4DGS file: its ``chkpnt*.pth`` or a ``loaded_pth`` dict (defaults:
    its D-NeRF setting, SH degree 3 with 2 time terms over time_duration [0, 1])."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return from_reference_layout(reference_params_from_checkpoint(obj), sh_degree, time_basis, time_start,
                                 time_period)


def save_reference_init(g: Gaussians4D, path, time_start: float = 0.0) -> None:
    """Write our Gaussians as a file the 4DGS code loads with its ``loaded_pth`` option."""
    torch.save(to_reference_layout(g, time_start), path)
