"""Image similarity shared by the evaluation and the fit's loss: SSIM, PSNR, LPIPS (network and
distance), resizing. No CLIP, no FVD: the fit imports this module, so editing the evaluation's
CLIP or FVD code never changes the fit's cache key.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

VGG16_FILENAME = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 (torch hub cache name)
PSNR_CAP_DB = 100.0  # PSNR of identical images is +inf; the d2 definitions report it capped here and flag it


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed (missing weights or package); the message says why."""


def _check_pair(x: Tensor, y: Tensor, name: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{name}: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected images [N, 3, H, W], got {tuple(x.shape)}")


def resize_square(x: Tensor, size: int | None) -> Tensor:
    """[N, 3, H, W] -> [N, 3, size, size] (bilinear, antialiased); unchanged when already that size."""
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


# --------------------------------------------------------------------------- SSIM / PSNR


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g.to(dtype=dtype, device=device)  # [size]


def ssim(x: Tensor, y: Tensor, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Mean SSIM per image pair, differentiable.

    Args:
        x, y: [N, 3, H, W] in [0, data_range]; H, W >= window_size.
    Returns:
        [N] SSIM, averaged over valid window positions and channels (scikit-image's
        ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``).
    """
    _check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim: images {tuple(x.shape[-2:])} smaller than the {window_size}px window")
    c = x.shape[1]
    g = _gaussian_window(window_size, sigma, x.dtype, x.device)
    w_row = g.view(1, 1, 1, -1).expand(c, 1, 1, window_size)  # [C, 1, 1, k]
    w_col = g.view(1, 1, -1, 1).expand(c, 1, window_size, 1)  # [C, 1, k, 1]

    def filt(z: Tensor) -> Tensor:  # separable valid Gaussian filter, per channel
        return F.conv2d(F.conv2d(z, w_row, groups=c), w_col, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = filt(x), filt(y)  # [N, C, H', W']
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    s_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s_map.mean(dim=(1, 2, 3))  # [N]


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per image pair: [N, 3, H, W] x2 -> [N]."""
    _check_pair(x, y, "mse")
    return ((x - y) ** 2).mean(dim=(1, 2, 3))


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0, cap_db: float = PSNR_CAP_DB) -> Tensor:
    """PSNR in dB per image pair ([N, 3, H, W] x2 -> [N]), capped at ``cap_db`` (identical images).

    Use :func:`psnr_capped` for the flag saying which values hit the cap.
    """
    err = mse(x, y)
    floor = data_range**2 * 10.0 ** (-cap_db / 10.0)
    return 10.0 * torch.log10(data_range**2 / err.clamp_min(floor))


def psnr_capped(x: Tensor, y: Tensor, data_range: float = 1.0, cap_db: float = PSNR_CAP_DB) -> Tensor:
    """[N] bool: which pairs are so close (e.g. identical) that their PSNR was capped."""
    floor = data_range**2 * 10.0 ** (-cap_db / 10.0)
    return mse(x, y) <= floor


# --------------------------------------------------------------------------- LPIPS


def vgg16_search_paths(explicit: Path | None = None) -> list[Path]:
    """Where the VGG16 ImageNet weights are looked for, in order."""
    paths: list[Path] = []
    if explicit is not None:
        return [Path(explicit)]
    env = os.environ.get("D2_WEIGHTS_DIR")
    if env:
        paths.append(Path(env) / VGG16_FILENAME)
    paths.append(Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME)
    return paths


def _find_file(paths: list[Path]) -> Path | None:
    for p in paths:
        if p.is_file():
            return p
    return None


def build_lpips(vgg_weights: Path | None = None, random_backbone: bool = False, device: str = "cpu") -> torch.nn.Module:
    """The LPIPS v0.1 VGG network (``lpips.LPIPS``), eval mode, frozen.

    The linear heads always come from the ``lpips`` package. The VGG16 backbone is loaded
    from ``vgg_weights`` (or the torch hub cache); ``random_backbone=True`` (tests only)
    keeps torchvision's random initialisation instead.

    Raises:
        MetricUnavailable: the backbone file is missing (the message names where it looked).
    """
    try:
        import lpips  # noqa: F401
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise MetricUnavailable(f"lpips: the `lpips` package is not installed ({e})") from e
    state = None
    if not random_backbone:
        candidates = vgg16_search_paths(vgg_weights)
        found = _find_file(candidates)
        if found is None:
            raise MetricUnavailable(
                "lpips: VGG16 ImageNet weights not found; looked for "
                + ", ".join(str(p) for p in candidates)
                + f". Copy torchvision's {VGG16_FILENAME} there or set metrics.lpips_vgg_weights."
            )
        state = torch.load(found, map_location="cpu", weights_only=True)
    import lpips

    import warnings

    with warnings.catch_warnings():  # torchvision's deprecation notes about lpips' `pretrained=` call
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if state is not None:
        _load_vgg_into_lpips(net, state)
    net = net.eval().to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _load_vgg_into_lpips(net: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Copy torchvision VGG16 ``features.{i}.*`` weights into lpips' sliced backbone."""
    slices = [getattr(net.net, f"slice{k}") for k in range(1, 6)]
    loaded = 0
    for sl in slices:
        for name, module in sl.named_children():  # children are named by their index in vgg.features
            if isinstance(module, torch.nn.Conv2d):
                module.weight.data.copy_(state[f"features.{name}.weight"])
                module.bias.data.copy_(state[f"features.{name}.bias"])
                loaded += 1
    if loaded != 13:
        raise MetricUnavailable(f"lpips: expected 13 VGG16 conv layers, loaded {loaded}")


def lpips_distance(net: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """LPIPS per pair: x, y [N, 3, H, W] in [0, 1] (mapped to [-1, 1] here) -> [N]."""
    _check_pair(x, y, "lpips")
    return net(x * 2 - 1, y * 2 - 1, normalize=False).view(-1)
