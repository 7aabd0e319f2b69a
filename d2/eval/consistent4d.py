"""Consistent4D's image-level metrics, computed as its evaluation script computes them.

Published Consistent4D-benchmark numbers (CLIP, LPIPS, PSNR, SSIM) come from
``evaluation/compute_image_level_metrics.py`` of the public Consistent4D repository. For each
(prediction, ground truth) image pair that script:

1. opens the PNG with PIL and resizes it to 512 x 512 with PIL's default filter (bicubic for
   RGB images), then takes it as a float tensor in [0, 255], ``[1, 3, 512, 512]``;
2. PSNR: torchmetrics' functional ``peak_signal_noise_ratio(pred, gt)`` with no data range,
   which in the torchmetrics of that time meant ``gt.max() - gt.min()`` of that image pair
   (current torchmetrics requires the argument; we pass that value);
3. SSIM: torchmetrics' functional ``structural_similarity_index_measure(pred, gt)`` with its
   defaults: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range
   ``max(pred.max() - pred.min(), gt.max() - gt.min())``; the torchmetrics of the script's time
   (the releases before 1.4.2, September 2024) averaged the SSIM map without its 5-px border
   ((window - 1) / 2 px on each side); 1.4.2 and later average the whole map, reflect-padded
   border included (their pull request 2721), which raises the SSIM of images on a flat
   background by about 0.01. :func:`ssim_script` computes the cropped mean itself, whatever
   torchmetrics is installed (see its docstring);
4. LPIPS: torchmetrics' ``LearnedPerceptualImagePatchSimilarity(net_type='vgg')`` on
   ``x / 127.5 - 1`` (torchvision's ImageNet VGG16 with torchmetrics' own linear heads);
5. CLIP: transformers' ``CLIPModel.get_image_features`` of ``openai/clip-vit-base-patch32``
   on the output of its ``CLIPImageProcessor`` (the PIL-based processor of that time: bicubic
   resize of the shorter side to 224, centre crop 224, OpenAI mean / std) applied to the
   512 px PIL image; cosine similarity of the two feature vectors;

then means over the frames of a view, sums the 4 views' means and divides by 4, and means over
objects. Ground-truth RGBA images must be put on white first (the script's README); the only
conversion code the script ships (its unused ``rgba=True`` branch) sets pixels with alpha 0
to white and keeps the colour of every other pixel, which is what :func:`on_white` does.

Every choice is spelled out here instead of being left to library defaults that have changed
since (torchmetrics' PSNR data range; transformers 5 made ``CLIPImageProcessor`` a torchvision
processor and kept the PIL one as ``CLIPImageProcessorPil``; ``get_image_features`` now
returns an output object whose ``pooler_output`` is the projected feature). Beyond the script:
images other than RGB / RGBA (palette, grey) are converted to RGB(A) by PIL first (the script
would fail on them), and an RGBA prediction gets the same conversion as the ground truth.

Weights come from local caches only: LPIPS needs torchvision's ``vgg16-397923af.pth``; CLIP
needs the ``openai/clip-vit-base-patch32`` snapshot in the Hugging Face cache. Missing weights
raise :class:`~d2.eval.metrics.MetricUnavailable` naming where they were looked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

SCRIPT_SIZE = 512  # the script resizes every image to this square size
HF_CLIP_ID = "openai/clip-vit-base-patch32"  # the script's CLIP
# The script calls ``image.resize((512, 512))``: Pillow's default filter for RGB images is bicubic.
SCRIPT_RESAMPLE = Image.Resampling.BICUBIC
SSIM_KERNEL_SIZE = 11  # torchmetrics' SSIM defaults, as the script used them
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_BORDER = (SSIM_KERNEL_SIZE - 1) // 2  # px cropped from each side of the SSIM map before its mean
SSIM_DEFINITION_SHORT = (f"SSIM = mean of the SSIM map without its {SSIM_BORDER}-px border (torchmetrics before "
                         "1.4.2, as published numbers were computed)")

C4D_METRIC_DEFINITIONS: dict[str, str] = {
    "clip": "CLIP similarity as Consistent4D's compute_image_level_metrics.py: each image resized to 512x512 "
            "(PIL bicubic), transformers CLIPModel.get_image_features of openai/clip-vit-base-patch32 on its "
            "PIL CLIPImageProcessor output (shorter side bicubic to 224, centre crop 224, OpenAI mean/std), "
            "cosine similarity. Higher is better.",
    "lpips": "LPIPS as the script: torchmetrics LearnedPerceptualImagePatchSimilarity(net_type='vgg') (torchvision "
             "ImageNet VGG16, torchmetrics' linear heads) on the 512x512 PIL-bicubic images mapped by x/127.5 - 1. "
             "Lower is better.",
    "psnr": "PSNR as the script: torchmetrics peak_signal_noise_ratio on the 512x512 PIL-bicubic images in "
            "[0, 255] with data range = ground truth max - min of that image (the old torchmetrics default, "
            "passed explicitly); identical images give +inf, a constant ground truth -inf or NaN, kept as the "
            "script would.",
    "ssim": "SSIM as the script's torchmetrics structural_similarity_index_measure computed it before 1.4.2: on "
            "the 512x512 PIL-bicubic images in "
            "[0, 255], Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range = max of the two images' max - "
            "min, per-pixel SSIM map averaged over channels and pixels with its 5-px border cropped (torchmetrics "
            ">= 1.4.2 averages the whole map instead); float32 without clamping the variances (torchmetrics "
            "<= 1.3.1).",
}


# --------------------------------------------------------------------------- images


def on_white(img: Image.Image, name: str = "image") -> Image.Image:
    """An RGB image: RGBA pixels with alpha 0 become white (255), other pixels keep their colour.

    This is the conversion in the script's ``load_and_preprocess_image(rgba=True)``; palette and
    grey images are converted by PIL to RGB(A) first; 16-bit and 32-bit images (which PIL would clip
    at 255) are scaled from their own range to 8 bits (:func:`d2.utils.io.pil_to_rgba`). Modes
    without an RGB meaning raise.
    """
    if img.mode not in ("P", "PA", "LA", "L", "1", "CMYK", "YCbCr", "RGB", "RGBA"):
        from d2.utils.io import pil_to_rgba

        rgba, _ = pil_to_rgba(img, name)  # [H, W, 4] in [0, 1]; raises for modes it cannot read
        img = Image.fromarray((rgba * 255.0 + 0.5).clip(0, 255).astype(np.uint8), "RGBA")
    if img.mode in ("P", "PA", "LA"):
        img = img.convert("RGBA")
    elif img.mode in ("L", "1", "CMYK", "YCbCr"):
        img = img.convert("RGB")
    if img.mode == "RGB":
        return img
    if img.mode != "RGBA":
        raise ValueError(f"{name}: PIL mode {img.mode!r} is not an 8-bit RGB or RGBA image")
    arr = np.array(img)
    rgb = arr[..., :3].copy()
    rgb[arr[..., 3] == 0] = 255
    return Image.fromarray(rgb)


def script_image(src: str | os.PathLike | Image.Image, size: int = SCRIPT_SIZE) -> Image.Image:
    """Open (when a path), put on white (:func:`on_white`) and resize to ``size`` x ``size`` (PIL bicubic)."""
    if isinstance(src, Image.Image):
        img, name = src, "image"
    else:
        img, name = Image.open(src), str(src)
        img.load()
    return on_white(img, name).resize((size, size), resample=SCRIPT_RESAMPLE)


def to_tensor255(imgs: list[Image.Image]) -> Tensor:
    """PIL RGB images of one size -> float32 [N, 3, H, W] in [0, 255] (the script's ``image_rgb``)."""
    return torch.stack([torch.from_numpy(np.array(im)).float().permute(2, 0, 1) for im in imgs])


def tensor_to_pil(x: Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> an 8-bit RGB PIL image (rounded): how a render is stored as PNG."""
    arr = (x.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


# --------------------------------------------------------------------------- PSNR / SSIM


def _check(pred: Tensor, gt: Tensor, name: str) -> None:
    if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"{name}: expected two [N, 3, H, W] batches of one shape, got {tuple(pred.shape)} "
                         f"and {tuple(gt.shape)}")


def psnr_script(pred: Tensor, gt: Tensor) -> Tensor:
    """Per-pair PSNR as the script: [N, 3, H, W] x2 in [0, 255] -> [N] (data range: gt max - min, per pair)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check(pred, gt, "psnr")
    out = [peak_signal_noise_ratio(p[None], g[None], data_range=float(g.max() - g.min()), base=10.0,
                                   reduction="elementwise_mean", dim=None) for p, g in zip(pred, gt)]
    return torch.stack(out)


def ssim_map_script(pred: Tensor, gt: Tensor, data_range: Tensor | float) -> Tensor:
    """The SSIM map of one pair as the script's torchmetrics computed it: [1, 3, H, W] x2 in [0, 255]
    -> [1, 3, H, W] float32.

    The arithmetic of torchmetrics up to 1.3.1 (the releases current when Consistent4D published
    its script, January 2024), step for step in float32: a Gaussian window of SSIM_KERNEL_SIZE taps, sigma
    SSIM_SIGMA (normalised, the outer product of the 1D window), over the image reflect-padded by
    SSIM_BORDER px (edge not repeated), so the map has the image's size; population statistics
    E[xy] - E[x] E[y]. The variances are not clamped at 0: torchmetrics 1.3.2 to 1.4.1 clamp
    them (a paper evaluated in spring 2024 may have used those), a one-sided float32 error that
    lowers the SSIM of images on a flat background by up to about 1e-3; unclamped, the float32
    mean is within about 1e-4 of the exact (float64) one.
    """
    if min(pred.shape[-2:]) < SSIM_KERNEL_SIZE:
        raise ValueError(f"ssim: images {tuple(pred.shape[-2:])} are smaller than the {SSIM_KERNEL_SIZE}-px window")
    x, y = pred.float(), gt.float()
    taps = torch.arange((1 - SSIM_KERNEL_SIZE) / 2, (1 + SSIM_KERNEL_SIZE) / 2, 1, dtype=torch.float32,
                        device=x.device)
    g = torch.exp(-((taps / SSIM_SIGMA) ** 2) / 2)
    g = (g / g.sum())[None]  # [1, K]
    c = x.shape[1]
    window = (g.t() @ g).expand(c, 1, SSIM_KERNEL_SIZE, SSIM_KERNEL_SIZE)
    pad = (SSIM_BORDER,) * 4
    xp, yp = (torch.nn.functional.pad(t, pad, mode="reflect") for t in (x, y))
    stats = torch.nn.functional.conv2d(torch.cat((xp, yp, xp * xp, yp * yp, xp * yp)), window, groups=c)
    mu_x, mu_y, exx, eyy, exy = stats.split(x.shape[0])
    mu_xx, mu_yy, mu_xy = mu_x.pow(2), mu_y.pow(2), mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    upper = 2 * (exy - mu_xy) + c2
    lower = (exx - mu_xx) + (eyy - mu_yy) + c2
    return ((2 * mu_xy + c1) * upper) / ((mu_xx + mu_yy + c1) * lower)


def ssim_script(pred: Tensor, gt: Tensor) -> Tensor:
    """Per-pair SSIM as the script computed it: [N, 3, H, W] x2 in [0, 255] -> [N] float32.

    Data range: max of the two images' max - min, per pair; the mean of :func:`ssim_map_script`
    over channels and pixels with SSIM_BORDER px cropped from each side (what torchmetrics'
    ``structural_similarity_index_measure`` returned before 1.4.2; it is independent of the
    padding, as a cropped pixel's window lies inside the image).
    """
    _check(pred, gt, "ssim")
    b = SSIM_BORDER
    out = []
    for p, g in zip(pred.float(), gt.float()):
        data_range = torch.maximum(p.max() - p.min(), g.max() - g.min())  # a float32 tensor, as the script's
        out.append(ssim_map_script(p[None], g[None], data_range)[..., b:-b, b:-b].reshape(-1).mean())
    return torch.stack(out)


# --------------------------------------------------------------------------- LPIPS


def build_lpips_script(vgg_weights: Path | None = None, device: str = "cpu",
                       vgg_state: dict[str, Tensor] | None = None) -> torch.nn.Module:
    """torchmetrics' VGG LPIPS network with torchvision's VGG16 weights from a local file.

    torchmetrics would fetch the VGG16 weights through torchvision (a download when they are
    not cached); here the network is built with a random backbone and the local file
    (``vgg_weights``, else ``$D2_WEIGHTS_DIR`` / the torch hub cache) is copied in.
    ``vgg_state`` (tests) gives the ``features.{i}.*`` tensors directly.

    Raises:
        MetricUnavailable: no VGG16 file found (the message names every path tried).
    """
    from d2.eval.perceptual import (VGG16_FILENAME, MetricUnavailable, _find_file, _load_vgg_into_lpips,
                                    vgg16_search_paths)

    if vgg_state is None:
        candidates = vgg16_search_paths(vgg_weights)
        found = _find_file(candidates)
        if found is None:
            raise MetricUnavailable(
                "lpips: VGG16 ImageNet weights not found; looked for " + ", ".join(str(p) for p in candidates)
                + f". Copy torchvision's {VGG16_FILENAME} there or set metrics.lpips_vgg_weights.")
        vgg_state = torch.load(found, map_location="cpu", weights_only=True)
    try:
        from torchmetrics.functional.image.lpips import _NoTrainLpips
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise MetricUnavailable(f"lpips: torchmetrics' LPIPS is not importable ({e})") from e
    net = _NoTrainLpips(net="vgg", pretrained=True, pnet_rand=True)  # linear heads: torchmetrics' vgg.pth
    _load_vgg_into_lpips(net, vgg_state)
    net = net.eval().to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def lpips_script(net: torch.nn.Module, pred: Tensor, gt: Tensor) -> Tensor:
    """Per-pair LPIPS as the script: [N, 3, H, W] x2 in [0, 255] -> [N] (inputs mapped by x / 127.5 - 1)."""
    from torchmetrics.functional.image.lpips import _lpips_update

    _check(pred, gt, "lpips")
    dev = next(net.parameters()).device
    return _lpips_update((pred / 127.5 - 1).to(dev), (gt / 127.5 - 1).to(dev), net, normalize=False).reshape(-1).cpu()


# --------------------------------------------------------------------------- CLIP


def clip_processor_class() -> type:
    """The PIL-based CLIP image processor: ``CLIPImageProcessorPil`` (transformers >= 5), else
    ``CLIPImageProcessor`` (transformers 4, where that class was the PIL one)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def load_clip_script(model_id: str = HF_CLIP_ID, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """transformers ``CLIPModel`` and the PIL ``CLIPImageProcessor`` of ``model_id`` (a hub id read
    from the local Hugging Face cache only, or a local folder).

    Raises:
        MetricUnavailable: not in the cache (the message names the folder looked in).
    """
    from d2.eval.perceptual import MetricUnavailable

    try:
        from transformers import CLIPModel
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise MetricUnavailable(f"clip: transformers is not installed ({e})") from e
    where = Path(model_id) if Path(model_id).is_dir() else hf_cache_dir() / ("models--" + model_id.replace("/", "--"))
    try:
        model = CLIPModel.from_pretrained(model_id, local_files_only=True)
        processor = clip_processor_class().from_pretrained(model_id, local_files_only=True)
    except (OSError, ValueError) as e:
        raise MetricUnavailable(
            f"clip: transformers CLIP {model_id!r} not found locally; looked in {where} (Hugging Face cache, "
            f"no download). Put the snapshot there (model.safetensors or pytorch_model.bin, config.json, "
            f"preprocessor_config.json) or set metrics.hf_clip_model to a local folder. ({type(e).__name__})") from e
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, processor


def clip_image_features_script(model: torch.nn.Module, processor: Any, imgs: list[Image.Image]) -> Tensor:
    """``get_image_features`` of the processed PIL images: [N, D] (not normalised)."""
    pixel_values = processor(images=imgs, return_tensors="pt")["pixel_values"]
    dev = next(model.parameters()).device
    out = model.get_image_features(pixel_values=pixel_values.to(dev))
    if not isinstance(out, Tensor):  # transformers >= 5: an output object holding the projected feature
        out = out.pooler_output
    return out.float().cpu()


def clip_script(model: torch.nn.Module, processor: Any, pred: list[Image.Image], gt: list[Image.Image]) -> Tensor:
    """Per-pair CLIP cosine similarity as the script: two lists of 512 px PIL images -> [N]."""
    if len(pred) != len(gt):
        raise ValueError(f"clip: {len(pred)} predictions vs {len(gt)} ground-truth images")
    fp = clip_image_features_script(model, processor, pred)
    fg = clip_image_features_script(model, processor, gt)
    return torch.nn.functional.cosine_similarity(fp, fg)


__all__ = [
    "C4D_METRIC_DEFINITIONS", "HF_CLIP_ID", "SCRIPT_SIZE", "SSIM_BORDER", "SSIM_DEFINITION_SHORT",
    "build_lpips_script", "clip_image_features_script", "clip_processor_class", "clip_script", "hf_cache_dir",
    "load_clip_script", "lpips_script", "on_white", "psnr_script", "script_image", "ssim_map_script",
    "ssim_script", "tensor_to_pil", "to_tensor255",
]
