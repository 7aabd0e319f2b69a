"""Rasterization of 3D Gaussians: gsplat on CUDA, the project's own dense PyTorch rasterizer elsewhere.

Both backends sit behind one function, :func:`rasterize`, with gsplat's conventions
(``gsplat.rasterization`` v1.5, "classic" mode, pinhole cameras):

* cameras: ``viewmats`` world-to-camera [..., C, 4, 4] with OpenCV axes (x right, y down,
  z forward) and pinhole intrinsics ``Ks`` [..., C, 3, 3] (see :mod:`d2.stages.cameras`);
* EWA splatting: 3D covariance -> camera frame -> 2D with the perspective Jacobian (the
  Jacobian's x/z and y/z clamped to 1.3x the field of view, as gsplat does), plus an
  ``eps2d`` low-pass on the 2D covariance's diagonal;
* culling: Gaussians in front of ``near_plane`` or beyond ``far_plane`` and Gaussians whose
  2D covariance is not positive definite are dropped;
* per pixel (pixel centres at integer + 0.5): depth-sorted front-to-back alpha compositing,
  ``alpha = min(0.999, opacity * exp(-d^T Sigma2d^-1 d / 2))`` (gsplat's clamp is 0.999; the
  original 3DGS code uses 0.99), contributions with alpha < 1/255 skipped, and a pixel stops
  before the Gaussian that would bring its transmittance to 1e-4 or below;
* output ``colors = sum_i w_i c_i + T * background`` and ``alphas = 1 - T``.

The torch backend bins Gaussians into square tiles (as gsplat does): a Gaussian enters a
tile when its opacity-aware bounding box (``min(3.33, sqrt(2 ln(255 opacity)))`` standard
deviations) overlaps it. Outside that box its alpha is below 1/255, so binning changes
nothing in the result; it only saves work. Tiles are processed in groups sized to
``max_elements`` (pixels x Gaussians per group); the compositing's backward is analytic
and recomputes the per-pixel terms from the group's inputs (as gsplat's does), so memory
stays bounded in training as well as in inference.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0  # contributions below this alpha are skipped (gsplat)
ALPHA_MAX = 0.999  # per-Gaussian alpha clamp (gsplat)
T_MIN = 1e-4  # a pixel stops before its transmittance would reach this (gsplat)

Backend = Literal["auto", "torch", "gsplat"]


def gsplat_available() -> bool:
    """True when the optional ``gsplat`` package imports."""
    try:
        import gsplat  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: Backend, device: torch.device | str) -> Literal["torch", "gsplat"]:
    """Pick the concrete backend: ``auto`` means gsplat on CUDA when importable, torch otherwise."""
    device = torch.device(device)
    if backend == "auto":
        return "gsplat" if device.type == "cuda" and gsplat_available() else "torch"
    if backend == "gsplat":
        if device.type != "cuda":
            raise ValueError(f"backend 'gsplat' needs CUDA tensors, got device {device}; use backend 'torch' or 'auto'")
        if not gsplat_available():
            raise ImportError("backend 'gsplat' requested but gsplat is not installed: pip install -e '.[gpu]'")
        return "gsplat"
    if backend == "torch":
        return "torch"
    raise ValueError(f"unknown rasterizer backend {backend!r}; expected 'auto', 'torch' or 'gsplat'")


def _check_shapes(
    means: Tensor, covars: Tensor, opacities: Tensor, colors: Tensor, viewmats: Tensor, Ks: Tensor
) -> tuple[tuple[int, ...], int, int, bool]:
    """Validate shapes; return (batch_dims, N, C, per_camera_colors)."""
    if means.dim() < 2 or means.shape[-1] != 3:
        raise ValueError(f"means must be [..., N, 3], got {tuple(means.shape)}")
    batch = tuple(means.shape[:-2])
    n = means.shape[-2]
    if covars.shape != (*batch, n, 3, 3):
        raise ValueError(f"covars must be {(*batch, n, 3, 3)}, got {tuple(covars.shape)}")
    if opacities.shape != (*batch, n):
        raise ValueError(f"opacities must be {(*batch, n)}, got {tuple(opacities.shape)}")
    if viewmats.dim() != len(batch) + 3 or tuple(viewmats.shape[:-3]) != batch or viewmats.shape[-2:] != (4, 4):
        raise ValueError(f"viewmats must be [{batch}..., C, 4, 4], got {tuple(viewmats.shape)}")
    c = viewmats.shape[-3]
    if Ks.shape != (*batch, c, 3, 3):
        raise ValueError(f"Ks must be {(*batch, c, 3, 3)}, got {tuple(Ks.shape)}")
    if colors.dim() == len(batch) + 2 and tuple(colors.shape[:-1]) == (*batch, n):
        per_cam = False
    elif colors.dim() == len(batch) + 3 and tuple(colors.shape[:-1]) == (*batch, c, n):
        per_cam = True
    else:
        raise ValueError(f"colors must be {(*batch, n)} + (D,) or {(*batch, c, n)} + (D,), got {tuple(colors.shape)}")
    return batch, n, c, per_cam


def rasterize(
    means: Tensor,  # [..., N, 3]
    covars: Tensor,  # [..., N, 3, 3]
    opacities: Tensor,  # [..., N]
    colors: Tensor,  # [..., N, D] or [..., C, N, D]
    viewmats: Tensor,  # [..., C, 4, 4]
    Ks: Tensor,  # [..., C, 3, 3]
    width: int,
    height: int,
    background: Tensor | None = None,  # [D] or [..., C, D]
    backend: Backend = "auto",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = 16,
    torch_tile_size: int = 8,
    max_elements: int = 1 << 23,
    info: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Render Gaussians into every camera of every batch entry.

    Args:
        means, covars, opacities: world-space Gaussians (leading batch dims ``...`` allow a
            different set of Gaussians per entry, e.g. one slice per time).
        colors: post-activation colours per Gaussian, or per camera and Gaussian.
        viewmats, Ks: cameras (OpenCV world-to-camera, pinhole intrinsics).
        width, height: image size in pixels.
        background: colour behind the Gaussians; None = black (zeros).
        backend: "torch" (dense PyTorch, any device, differentiable), "gsplat" (CUDA),
            or "auto" (gsplat on CUDA when importable, torch otherwise).
        near_plane, far_plane: depth culling planes (camera z).
        eps2d: low-pass added to the 2D covariance's diagonal (pixels^2).
        tile_size: gsplat backend: tile side (pixels).
        torch_tile_size: torch backend: tile side for binning Gaussians (pixels; smaller
            tiles mean shorter per-tile lists and less dense work on CPU).
        max_elements: torch backend: bound on pixels x Gaussians evaluated at once.
        info: when a dict is given, it receives the screen-space statistics densification
            needs: ``means2d`` [..., C, N, 2] (pixels; a non-leaf tensor whose ``.grad`` is kept
            after backward), ``radii`` [..., C, N] (pixels, 0 where not drawn) and ``visible``
            [..., C, N] (bool: in front of the camera, not culled, on screen).

    Returns:
        render_colors: [..., C, H, W, D]; render_alphas: [..., C, H, W, 1].
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    batch, n, c, per_cam = _check_shapes(means, covars, opacities, colors, viewmats, Ks)
    d = colors.shape[-1]
    if background is not None:
        background = background.to(device=colors.device, dtype=colors.dtype)
        if background.shape[-1] != d:
            raise ValueError(f"background must end in D={d} channels, got {tuple(background.shape)}")
        background = background.expand(*batch, c, d)
    which = resolve_backend(backend, means.device)
    if which == "gsplat":
        return _rasterize_gsplat(means, covars, opacities, colors, viewmats, Ks, width, height, background,
                                 near_plane, far_plane, eps2d, tile_size, info)
    return _rasterize_torch(means, covars, opacities, colors, viewmats, Ks, width, height, background,
                            near_plane, far_plane, eps2d, torch_tile_size, max_elements, per_cam, info)


def _rasterize_gsplat(
    means: Tensor, covars: Tensor, opacities: Tensor, colors: Tensor, viewmats: Tensor, Ks: Tensor,
    width: int, height: int, background: Tensor | None, near_plane: float, far_plane: float, eps2d: float,
    tile_size: int, info: dict | None = None,
) -> tuple[Tensor, Tensor]:
    import gsplat  # optional extra "gpu"; imported only here

    means, covars, opacities, colors, viewmats, Ks = (
        x.contiguous() for x in (means, covars, opacities, colors, viewmats, Ks))  # gsplat views them flat
    out_colors, out_alphas, _meta = gsplat.rasterization(
        means, None, None, opacities, colors, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, tile_size=tile_size,
        rasterize_mode="classic", covars=covars,
        **({"packed": False} if info is not None else {}),  # unpacked: per-camera [..., C, N] statistics
    )
    if info is not None:
        m2 = _meta["means2d"]  # [..., C, N, 2] pixels
        if m2.requires_grad:
            m2.retain_grad()
        radii = _meta["radii"]
        radii = radii.amax(-1) if radii.dim() == m2.dim() else radii  # gsplat >= 1.5: [..., C, N, 2]
        info.update(means2d=m2, radii=radii.float(), visible=radii > 0)
    if background is not None:
        # composite here (colour + T * background, as gsplat does): gsplat 1.5.3's own
        # `backgrounds` check rejects batched leading dims
        out_colors = out_colors + (1.0 - out_alphas) * background[..., None, None, :]
    return out_colors, out_alphas


def project(
    means: Tensor,  # [..., N, 3]
    covars: Tensor,  # [..., N, 3, 3]
    viewmats: Tensor,  # [..., C, 4, 4]
    Ks: Tensor,  # [..., C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EWA projection of 3D Gaussians (gsplat's pinhole ``persp_proj`` + ``add_blur``).

    Returns:
        means2d [..., C, N, 2] (pixels), conics [..., C, N, 3] (inverse 2D covariance
        a, b, c of [[a, b], [b, c]]), cov2d [..., C, N, 3] (blurred 2D covariance, same
        layout), depths [..., C, N] (camera z), valid [..., C, N] (bool).
    """
    R = viewmats[..., :3, :3]  # [..., C, 3, 3]
    t = viewmats[..., :3, 3]  # [..., C, 3]
    mean_c = torch.einsum("...cij,...nj->...cni", R, means) + t.unsqueeze(-2)  # [..., C, N, 3]
    cov_c = torch.einsum("...cij,...njk,...clk->...cnil", R, covars, R)  # [..., C, N, 3, 3]
    x, y, z = mean_c.unbind(-1)  # [..., C, N]
    valid = (z >= near_plane) & (z <= far_plane)
    z_safe = torch.where(valid, z, torch.ones_like(z))  # keeps gradients finite for culled Gaussians
    fx = Ks[..., 0, 0].unsqueeze(-1)  # [..., C, 1]
    fy = Ks[..., 1, 1].unsqueeze(-1)
    cx = Ks[..., 0, 2].unsqueeze(-1)
    cy = Ks[..., 1, 2].unsqueeze(-1)
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    rz = 1.0 / z_safe
    tx = z_safe * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x * rz))
    ty = z_safe * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y * rz))
    zero = torch.zeros_like(rz)
    J = torch.stack(
        [torch.stack([fx * rz, zero, -fx * tx * rz * rz], -1), torch.stack([zero, fy * rz, -fy * ty * rz * rz], -1)],
        dim=-2,
    )  # [..., C, N, 2, 3]
    cov2d = J @ cov_c @ J.transpose(-1, -2)  # [..., C, N, 2, 2]
    a = cov2d[..., 0, 0] + eps2d
    b = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    cc = cov2d[..., 1, 1] + eps2d
    det = a * cc - b * b
    valid = valid & (det > 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([cc / det_safe, -b / det_safe, a / det_safe], -1)  # [..., C, N, 3]
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], -1)  # [..., C, N, 2]
    return means2d, conics, torch.stack([a, b, cc], -1), z, valid


def _composite_forward(
    pix: Tensor,  # [G, P, 2] pixel centres of G tiles
    means2d: Tensor,  # [G, K, 2] Gaussians gathered per tile, front to back
    conics: Tensor,  # [G, K, 3]
    opac: Tensor,  # [G, K] (0 where the Gaussian is culled or padding)
) -> dict[str, Tensor]:
    """Per-pixel, per-Gaussian quantities of front-to-back compositing (no autograd)."""
    dx = means2d[..., 0].unsqueeze(1) - pix[..., 0].unsqueeze(2)  # [G, P, K]
    dy = means2d[..., 1].unsqueeze(1) - pix[..., 1].unsqueeze(2)
    ca, cb, cc = (v.unsqueeze(1) for v in conics.unbind(-1))  # [G, 1, K]
    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy  # [G, P, K]
    raw = opac.unsqueeze(1) * torch.exp(-sigma)  # [G, P, K]
    keep = (sigma >= 0) & (raw >= ALPHA_THRESHOLD)  # alpha >= 1/255 (the clamp is above the threshold)
    alpha = torch.where(keep, raw.clamp(max=ALPHA_MAX), 0.0)
    log_1ma = torch.log1p(-alpha)
    log_t = torch.cumsum(log_1ma, dim=-1)  # inclusive log transmittance
    # a pixel stops before the Gaussian that would bring T to <= T_MIN (exclusive, as gsplat)
    alive = log_t > math.log(T_MIN)
    t_excl = torch.exp(log_t - log_1ma)  # transmittance in front of each Gaussian
    weights = torch.where(alive, alpha * t_excl, 0.0)  # [G, P, K]
    # alpha's derivative is live only where it is kept and not clamped
    live = keep & (raw < ALPHA_MAX) & alive
    return {"dx": dx, "dy": dy, "alpha": alpha, "t_excl": t_excl, "weights": weights, "live": live, "alive": alive}


class _Composite(torch.autograd.Function):
    """Compositing with an analytic backward that recomputes the forward (bounded memory)."""

    @staticmethod
    def forward(ctx, pix: Tensor, means2d: Tensor, conics: Tensor, opac: Tensor, colors: Tensor
                ) -> tuple[Tensor, Tensor]:
        f = _composite_forward(pix, means2d, conics, opac)
        ctx.save_for_backward(pix, means2d, conics, opac, colors)
        return f["weights"] @ colors, f["weights"].sum(-1)

    @staticmethod
    def backward(ctx, d_color: Tensor, d_acc: Tensor):  # [G, P, D], [G, P]
        pix, means2d, conics, opac, colors = ctx.saved_tensors
        f = _composite_forward(pix, means2d, conics, opac)
        w, alpha = f["weights"], f["alpha"]
        d_colors = w.transpose(-1, -2) @ d_color  # [G, K, D]
        g = d_color @ colors.transpose(-1, -2) + d_acc.unsqueeze(-1)  # dL/dw [G, P, K]
        gw = torch.where(f["alive"], g * w, 0.0)
        later = gw.sum(-1, keepdim=True) - torch.cumsum(gw, dim=-1)  # sum_{k > i} g_k w_k
        d_alpha = torch.where(f["live"], g * f["t_excl"] - later / (1.0 - alpha), 0.0)
        # alpha = opac * exp(-sigma): d alpha / d opac = alpha / opac, d alpha / d sigma = -alpha
        d_sigma = -d_alpha * alpha  # [G, P, K]
        dx, dy = f["dx"], f["dy"]
        ca, cb, cc = (v.unsqueeze(1) for v in conics.unbind(-1))
        d_mx = (d_sigma * (ca * dx + cb * dy)).sum(1)  # [G, K]
        d_my = (d_sigma * (cc * dy + cb * dx)).sum(1)
        d_conics = torch.stack([(0.5 * d_sigma * dx * dx).sum(1), (d_sigma * dx * dy).sum(1),
                                (0.5 * d_sigma * dy * dy).sum(1)], -1)  # [G, K, 3]
        safe_opac = torch.where(opac > 0, opac, torch.ones_like(opac))
        d_opac = (d_alpha * alpha).sum(1) / safe_opac  # [G, K]
        return None, torch.stack([d_mx, d_my], -1), d_conics, d_opac, d_colors


def _composite_tiles(
    pix: Tensor,  # [G, P, 2]
    means2d: Tensor,  # [G, K, 2]
    conics: Tensor,  # [G, K, 3]
    opac: Tensor,  # [G, K]
    colors: Tensor,  # [G, K, D]
) -> tuple[Tensor, Tensor]:
    """Front-to-back compositing of K depth-sorted Gaussians over the P pixels of G tiles.

    Returns (sum_i w_i c_i [G, P, D], sum_i w_i [G, P]).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (means2d, conics, opac, colors)):
        return _Composite.apply(pix, means2d, conics, opac, colors)
    w = _composite_forward(pix, means2d, conics, opac)["weights"]
    return w @ colors, w.sum(-1)


def _rasterize_torch(
    means: Tensor, covars: Tensor, opacities: Tensor, colors: Tensor, viewmats: Tensor, Ks: Tensor,
    width: int, height: int, background: Tensor | None, near_plane: float, far_plane: float, eps2d: float,
    tile_size: int, max_elements: int, per_cam: bool, info: dict | None = None,
) -> tuple[Tensor, Tensor]:
    batch = tuple(means.shape[:-2])
    n = means.shape[-2]
    c = viewmats.shape[-3]
    d = colors.shape[-1]
    means2d, conics, cov2d, depths, valid = project(means, covars, viewmats, Ks, width, height, eps2d,
                                                    near_plane, far_plane)
    if info is not None:
        if means2d.requires_grad:
            means2d.retain_grad()
        info.update(_screen_stats(means2d, cov2d, valid, opacities.unsqueeze(-2).expand(*batch, c, n), width,
                                  height))
    b = math.prod(batch) * c
    opac = opacities.unsqueeze(-2).expand(*batch, c, n).reshape(b, n)
    cols = (colors if per_cam else colors.unsqueeze(-3).expand(*batch, c, n, d)).reshape(b, n, d)
    args = (means2d.reshape(b, n, 2), conics.reshape(b, n, 3), cov2d.reshape(b, n, 3), depths.reshape(b, n),
            valid.reshape(b, n), opac, cols)
    # bound the tile-binning tensors too: split the images into groups
    n_tiles = math.ceil(width / tile_size) * math.ceil(height / tile_size)
    per = max(1, max_elements // max(1, n * n_tiles))
    outs = [_splat_images(*(a[i:i + per] for a in args), width, height, tile_size, max_elements)
            for i in range(0, b, per)]
    col = torch.cat([o[0] for o in outs])  # [b, H, W, D]
    alp = torch.cat([o[1] for o in outs])  # [b, H, W, 1]
    if background is not None:
        col = col + (1.0 - alp) * background.reshape(b, 1, 1, d)
    return col.reshape(*batch, c, height, width, d), alp.reshape(*batch, c, height, width, 1)


@torch.no_grad()
def _screen_stats(means2d: Tensor, cov2d: Tensor, valid: Tensor, opac: Tensor, width: int, height: int) -> dict:
    """Radii (3 standard deviations of the 2D covariance's major axis, rounded up, as 3DGS) and
    visibility: valid, opacity at least 1/255, and the 3-sigma box overlapping the image."""
    a, b, c = cov2d.detach().unbind(-1)
    mid = 0.5 * (a + c)
    lam = mid + torch.sqrt((mid * mid - (a * c - b * b)).clamp(min=0.1))
    radii = torch.ceil(3.0 * torch.sqrt(lam.clamp(min=0)))
    m = means2d.detach()
    on_screen = ((m[..., 0] + radii > 0) & (m[..., 0] - radii < width) & (m[..., 1] + radii > 0)
                 & (m[..., 1] - radii < height))
    visible = valid & (opac.detach() >= ALPHA_THRESHOLD) & on_screen & (radii > 0)
    return {"means2d": means2d, "radii": torch.where(visible, radii, torch.zeros_like(radii)), "visible": visible}


def _splat_images(
    means2d: Tensor,  # [b, n, 2]
    conics: Tensor,  # [b, n, 3]
    cov2d: Tensor,  # [b, n, 3]
    depths: Tensor,  # [b, n]
    valid: Tensor,  # [b, n]
    opac: Tensor,  # [b, n]
    cols: Tensor,  # [b, n, D]
    width: int,
    height: int,
    tile_size: int,
    max_elements: int,
) -> tuple[Tensor, Tensor]:
    """Sort, bin and composite projected Gaussians into b images: ([b, H, W, D], [b, H, W, 1])."""
    b, n, d = cols.shape
    dtype, device = means2d.dtype, means2d.device
    valid = valid & (opac >= ALPHA_THRESHOLD)
    opac = torch.where(valid, opac, torch.zeros_like(opac))

    # depth sort (culled Gaussians last), then bin into tiles with gsplat's opacity-aware boxes
    order = torch.argsort(torch.where(valid, depths, torch.full_like(depths, float("inf"))).detach(), dim=-1)
    means2d = torch.gather(means2d, 1, order.unsqueeze(-1).expand(b, n, 2))
    conics = torch.gather(conics, 1, order.unsqueeze(-1).expand(b, n, 3))
    cov2d = torch.gather(cov2d.detach(), 1, order.unsqueeze(-1).expand(b, n, 3))
    opac = torch.gather(opac, 1, order)
    cols = torch.gather(cols, 1, order.unsqueeze(-1).expand(b, n, d))
    valid = torch.gather(valid, 1, order)
    with torch.no_grad():
        extend = torch.sqrt(2.0 * torch.log(torch.clamp(opac, min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extend = torch.clamp(extend, max=3.33)
        rx = torch.ceil(extend * torch.sqrt(cov2d[..., 0].clamp(min=0)))  # [b, n]
        ry = torch.ceil(extend * torch.sqrt(cov2d[..., 2].clamp(min=0)))
        m2 = means2d.detach()
        tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
        x0 = torch.arange(tw, device=device, dtype=dtype) * tile_size  # [tw]
        y0 = torch.arange(th, device=device, dtype=dtype) * tile_size  # [th]
        over_x = (m2[..., None, 0] + rx[..., None] > x0) & (m2[..., None, 0] - rx[..., None] < x0 + tile_size)
        over_y = (m2[..., None, 1] + ry[..., None] > y0) & (m2[..., None, 1] - ry[..., None] < y0 + tile_size)
        hit = over_y.unsqueeze(-1) & over_x.unsqueeze(-2) & valid[..., None, None]  # [b, n, th, tw]
        hit = hit.reshape(b, n, th * tw).transpose(1, 2).reshape(b * th * tw, n)  # [b*T, n] work items
        counts = hit.sum(-1)  # [b*T]
        order = torch.argsort(counts, descending=True)
        sorted_counts = counts[order].tolist()
        pos = torch.arange(n, device=device)
    n_tiles = th * tw

    # pixel centres per tile (tiles may overhang the image; those pixels are dropped at the end)
    ly, lx = torch.meshgrid(torch.arange(tile_size, device=device, dtype=dtype),
                            torch.arange(tile_size, device=device, dtype=dtype), indexing="ij")
    local = torch.stack([lx, ly], -1).reshape(-1, 2) + 0.5  # [P, 2]
    ty_, tx_ = torch.meshgrid(y0, x0, indexing="ij")
    origin = torch.stack([tx_, ty_], -1).reshape(n_tiles, 1, 2)  # [T, 1, 2]
    pix = origin + local  # [T, P, 2]
    p = tile_size * tile_size

    # groups of work items with similar list lengths (sorted, longest first), each padded to
    # its own longest list and bounded by max_elements
    groups: list[tuple[int, int, int]] = []  # (start, end, K) in sorted order
    i = 0
    while i < len(sorted_counts) and sorted_counts[i] > 0:
        k = sorted_counts[i]
        cap = max(1, max_elements // (p * k))
        j = i + 1
        while j < len(sorted_counts) and j - i < cap and sorted_counts[j] > 0.6 * k:
            j += 1
        groups.append((i, j, k))
        i = j
    n_empty = len(sorted_counts) - i
    out_c, out_a = [], []
    for gs, ge, k in groups:
        items = order[gs:ge]  # [G]
        with torch.no_grad():
            key = torch.where(hit[items], pos, pos + n)  # [G, n]: hits first, in depth order
            sel = torch.topk(key, k, dim=-1, largest=False, sorted=True).indices  # [G, k]
            sel_ok = torch.gather(hit[items], 1, sel)  # [G, k] False on padding
        img = (items // n_tiles)[:, None]  # [G, 1]
        g_m = means2d[img, sel]  # [G, k, 2]
        g_c = conics[img, sel]
        g_o = torch.where(sel_ok, opac[img, sel], torch.zeros((), dtype=dtype, device=device))
        g_col = cols[img, sel]
        g_pix = pix[items % n_tiles]  # [G, P, 2]
        col_t, a_t = _composite_tiles(g_pix, g_m, g_c, g_o, g_col)
        out_c.append(col_t)
        out_a.append(a_t)
    out_c.append(means2d.new_zeros(n_empty, p, d))
    out_a.append(means2d.new_zeros(n_empty, p))
    inv = torch.argsort(order)
    col = torch.cat(out_c, 0)[inv].reshape(b, n_tiles, p, d)  # [b, T, P, D]
    alp = torch.cat(out_a, 0)[inv].reshape(b, n_tiles, p)  # [b, T, P]
    # tiles -> image
    col = col.reshape(b, th, tw, tile_size, tile_size, d).permute(0, 1, 3, 2, 4, 5)
    col = col.reshape(b, th * tile_size, tw * tile_size, d)[:, :height, :width]
    alp = alp.reshape(b, th, tw, tile_size, tile_size).permute(0, 1, 3, 2, 4)
    alp = alp.reshape(b, th * tile_size, tw * tile_size)[:, :height, :width, None]
    return col, alp
