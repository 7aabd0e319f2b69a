"""Image and video metrics: SSIM, PSNR, LPIPS (VGG), CLIP similarity, FVD.

Two sets of image-metric definitions (a protocol chooses one, ``Protocol.metric_definitions``):

* ``consistent4d``: what Consistent4D's ``evaluation/compute_image_level_metrics.py`` computes
  (torchmetrics PSNR / SSIM / LPIPS and transformers CLIP on 512 px PIL-bicubic images in
  [0, 255]); see :mod:`d2.eval.consistent4d`. Published Consistent4D-benchmark numbers compare
  only with these.
* ``d2``: our own definitions below (images in [0, 1], PSNR with data range 1 and a cap,
  scikit-image SSIM over valid windows, ``lpips`` package LPIPS, open_clip CLIP).

A :class:`MetricSuite` is built for one set (``build_metric_suite(..., definitions=...)``).

Conventions of the ``d2`` definitions: images are float ``[N, 3, H, W]`` in [0, 1] (white background); every
per-image metric returns one value per pair, ``[N]``. SSIM, PSNR and LPIPS are
differentiable (the fitting stage uses SSIM and LPIPS as losses).

Weights. LPIPS needs torchvision's ImageNet VGG16 (``vgg16-397923af.pth``) besides the
linear heads that ship inside the ``lpips`` package; CLIP similarity needs the OpenAI
ViT-B/32 checkpoint; FVD needs an I3D TorchScript file. None can be downloaded here. A
metric whose weights are missing is *unavailable*: :class:`MetricSuite` records the reason
(naming each file it looked for) and the results tables print "unavailable"; no number is
ever computed from random weights outside tests. ``require`` turns unavailability into
:class:`MetricUnavailable`.

Test hooks: :func:`build_lpips` with ``random_backbone=True`` and :func:`tiny_clip_model`
build the same code paths on random weights so the plumbing (symmetry, batch-order
invariance, identical-image values) can be tested without weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol as TypingProtocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from d2.eval.perceptual import (PSNR_CAP_DB, VGG16_FILENAME, MetricUnavailable, _check_pair, _find_file,  # noqa: F401
                                _gaussian_window, _load_vgg_into_lpips, build_lpips, lpips_distance, mse, psnr,
                                psnr_capped, resize_square, ssim, vgg16_search_paths)

MetricName = Literal["clip", "lpips", "psnr", "ssim", "fvd"]
Definitions = Literal["consistent4d", "d2"]  # image-metric formulas: Consistent4D's script, or ours
ALL_METRICS: tuple[str, ...] = ("clip", "lpips", "psnr", "ssim", "fvd")
# Direction of each metric (True: higher is better), for tables.
HIGHER_IS_BETTER: dict[str, bool] = {"clip": True, "lpips": False, "psnr": True, "ssim": True, "fvd": False}

# File names as the upstream tools cache them.
CLIP_HF_REPO = "timm/vit_base_patch32_clip_224.openai"  # open_clip's hub location of the OpenAI ViT-B/32
CLIP_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CLIP_OPENAI_FILENAME = "ViT-B-32.pt"  # OpenAI's own `clip` package cache name (~/.cache/clip)
I3D_FILENAME = "i3d_torchscript.pt"  # StyleGAN-V's TorchScript I3D (Kinetics-400)

# OpenAI CLIP normalisation (open_clip's OPENAI_DATASET_MEAN / STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# FVD is ours under both definition sets (one number per benchmark); the text says how it
# differs from Consistent4D's compute_fvd.py.
FVD_DEFINITION = (
    "pooled over the benchmark, not Consistent4D's per-view FVD: one I3D (Kinetics-400, StyleGAN-V TorchScript, 400-d "
    "logits) feature per (object, view) video of the scored frames, bilinear to 224, in [-1, 1]; Frechet "
    "distance between Gaussians fitted to all predicted and all ground-truth videos pooled over objects and "
    "views (one number per benchmark). With N videos per side the covariances have rank <= N-1 (28 for "
    "Consistent4D's 7 objects x 4 views), so values compare only at equal N. Consistent4D's compute_fvd.py "
    "instead takes each (object, view) pair alone: the frames of one predicted and one ground-truth video "
    "(PIL bicubic per channel to 224, [-1, 1]) through DisCo's I3D (i3d_pretrained_400.pt), 400-d logits "
    "averaged over time, i.e. one feature vector per side; np.cov of one vector is NaN in every entry "
    "(ddof 1), so its Frechet distance is undefined: scipy.linalg.sqrtm of the NaN product raises (ValueError "
    "where sqrtm checks finiteness, LinAlgError for small matrices in SciPy 1.17, where a 400 x 400 one did not "
    "return within a minute), and the per-view mean it would average over views and objects cannot be "
    "reproduced.")

METRIC_DEFINITIONS: dict[str, str] = {
    "clip": "CLIP similarity: cosine of CLIP ViT-B/32 (OpenAI weights, open-clip-torch) image features of "
            "prediction and ground truth; images resized to the eval resolution, then bicubic to 224 and "
            "normalised with the OpenAI mean/std. Higher is better, 1 for identical images.",
    "lpips": "LPIPS v0.1 with the VGG16 backbone (ImageNet weights) and the package's linear heads, images at "
             "the eval resolution mapped to [-1, 1]. Lower is better, 0 for identical images.",
    "psnr": f"PSNR = 10 log10(1 / MSE) over all pixels and channels, images in [0, 1]; identical images "
            f"(MSE = 0) are capped at {PSNR_CAP_DB:g} dB and counted as capped.",
    "ssim": "SSIM (Wang et al. 2004): Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, "
            "valid windows only, per channel then averaged (= scikit-image, gaussian_weights=True).",
    "fvd": FVD_DEFINITION,
}


def metric_definitions(definitions: str = "d2") -> dict[str, str]:
    """Metric -> one-line definition, for ``definitions`` ``"consistent4d"`` (the script's) or ``"d2"``."""
    if definitions == "consistent4d":
        from d2.eval.consistent4d import C4D_METRIC_DEFINITIONS

        return {**C4D_METRIC_DEFINITIONS, "fvd": FVD_DEFINITION}
    if definitions == "d2":
        return dict(METRIC_DEFINITIONS)
    raise ValueError(f"unknown metric definitions {definitions!r}; known: consistent4d, d2")


class MetricsConfig(BaseModel):
    """Which metrics to compute and where their weights are."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[MetricName] = Field(default_factory=lambda: list(ALL_METRICS))  # metrics to compute
    clip_weights: Path | None = None  # d2 definitions: OpenAI ViT-B/32 checkpoint (open_clip .safetensors/.bin or OpenAI ViT-B-32.pt); None: search caches
    hf_clip_model: str = "openai/clip-vit-base-patch32"  # consistent4d definitions: transformers CLIP, a hub id read from the Hugging Face cache only (no download) or a local folder
    lpips_vgg_weights: Path | None = None  # torchvision vgg16-397923af.pth; None: search the torch hub cache
    i3d_weights: Path | None = None  # I3D TorchScript file for FVD; None: search $D2_WEIGHTS_DIR
    device: str = Field("cpu", json_schema_extra={"no_effect": True})  # torch device the metric networks run on
    resolution: int | None = 512  # images are resized to this square size before scoring (None: native); evaluate() sets it to protocol.resolution
    batch_size: int = Field(16, ge=1, json_schema_extra={"no_effect": True})  # images per forward pass of CLIP / LPIPS


# --------------------------------------------------------------------------- checks


# --------------------------------------------------------------------------- CLIP


def clip_search_paths(explicit: Path | None = None) -> list[Path]:
    """Where the OpenAI CLIP ViT-B/32 checkpoint is looked for, in order."""
    if explicit is not None:
        return [Path(explicit)]
    paths: list[Path] = []
    env = os.environ.get("D2_WEIGHTS_DIR")
    if env:
        paths += [Path(env) / f for f in CLIP_HF_FILES] + [Path(env) / CLIP_OPENAI_FILENAME]
    hf_home = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snap = hf_home / ("models--" + CLIP_HF_REPO.replace("/", "--")) / "snapshots"
    if snap.is_dir():
        for d in sorted(snap.iterdir()):
            paths += [d / f for f in CLIP_HF_FILES]
    else:
        paths.append(snap / "<revision>" / CLIP_HF_FILES[0])
    paths.append(Path.home() / ".cache" / "clip" / CLIP_OPENAI_FILENAME)
    return paths


def load_clip_model(weights: Path | None = None, device: str = "cpu") -> torch.nn.Module:
    """CLIP ViT-B/32 with the OpenAI weights from a local file (open_clip, QuickGELU as OpenAI trained it).

    Raises:
        MetricUnavailable: no checkpoint found (the message lists every path tried).
    """
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover
        raise MetricUnavailable(f"clip: open-clip-torch is not installed ({e})") from e
    candidates = clip_search_paths(weights)
    found = _find_file(candidates)
    if found is None:
        raise MetricUnavailable(
            "clip: OpenAI CLIP ViT-B/32 weights not found; looked for "
            + ", ".join(str(p) for p in candidates)
            + f". Put open_clip's {CLIP_HF_FILES[0]} (hub repo {CLIP_HF_REPO}) or OpenAI's {CLIP_OPENAI_FILENAME} "
              "there, or set metrics.clip_weights."
        )
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    load_clip_checkpoint(model, found)
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_clip_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Load CLIP weights into an open_clip ``model`` from OpenAI's TorchScript ``ViT-B-32.pt`` or an
    open_clip state dict (``.safetensors`` / ``.bin``); every key must match."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:  # OpenAI's own checkpoint is a TorchScript archive
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    non_persistent = {n for n, _ in model.named_buffers()} - set(model.state_dict())  # e.g. attn_mask
    for key in ("input_resolution", "context_length", "vocab_size", *non_persistent):
        state.pop(key, None)
    model.load_state_dict(state, strict=True)


def tiny_clip_model(embed_dim: int = 16, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight open_clip CLIP (224 px, 1 layer) for tests of the CLIP code path."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIP(
            embed_dim=embed_dim,
            vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=32, image_size=224),
            text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
            quick_gelu=True,
        )
    finally:
        torch.random.set_rng_state(gen_state)
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def clip_preprocess(x: Tensor, eval_resolution: int | None = 512, model_size: int = 224) -> Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, 3, 224, 224] normalised CLIP input.

    Resize to the eval resolution (bilinear, antialiased), then bicubic to the model's 224
    (square images: open_clip's resize + centre crop is a plain resize), then the OpenAI
    mean/std.
    """
    x = resize_square(x, eval_resolution)
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"clip: expected square images, got {tuple(x.shape[-2:])}")
    x = F.interpolate(x, size=(model_size, model_size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_image_features(model: torch.nn.Module, x: Tensor, eval_resolution: int | None = 512) -> Tensor:
    """Unit-norm CLIP image features: [N, 3, H, W] in [0, 1] -> [N, D]."""
    size = _clip_image_size(model)
    feats = model.encode_image(clip_preprocess(x, eval_resolution, size))  # [N, D]
    return F.normalize(feats.float(), dim=-1)


def _clip_image_size(model: torch.nn.Module) -> int:
    s = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(s[0] if isinstance(s, (tuple, list)) else s)


def clip_similarity(model: torch.nn.Module, x: Tensor, y: Tensor, eval_resolution: int | None = 512) -> Tensor:
    """Cosine similarity of CLIP image features per pair: [N, 3, H, W] x2 -> [N]."""
    _check_pair(x, y, "clip")
    fx = clip_image_features(model, x, eval_resolution)
    fy = clip_image_features(model, y, eval_resolution)
    return (fx * fy).sum(dim=-1)


# --------------------------------------------------------------------------- FVD


class VideoFeatureExtractor(TypingProtocol):
    """Maps videos [B, T, 3, H, W] in [0, 1] to one feature vector each, [B, D]."""

    def __call__(self, videos: Tensor) -> Tensor: ...


def i3d_search_paths(explicit: Path | None = None) -> list[Path]:
    """Where the I3D TorchScript file is looked for."""
    if explicit is not None:
        return [Path(explicit)]
    paths = []
    env = os.environ.get("D2_WEIGHTS_DIR")
    if env:
        paths.append(Path(env) / I3D_FILENAME)
    paths.append(Path(torch.hub.get_dir()) / "checkpoints" / I3D_FILENAME)
    return paths


class I3DFeatures:
    """I3D (Kinetics-400) features from StyleGAN-V's TorchScript detector.

    Videos [B, T, 3, H, W] in [0, 1] (square frames) are resized to 224 (bilinear), mapped to [-1, 1], laid out as
    [B, 3, T, 224, 224] and passed with ``rescale=False, resize=False, return_features=True``
    (the 400-d pre-softmax logits, as StyleGAN-V's FVD uses).
    """

    def __init__(self, weights: Path | None = None, device: str = "cpu") -> None:
        candidates = i3d_search_paths(weights)
        found = _find_file(candidates)
        if found is None:
            raise MetricUnavailable(
                "fvd: I3D TorchScript weights not found; looked for " + ", ".join(str(p) for p in candidates)
                + f". Put StyleGAN-V's {I3D_FILENAME} there or set metrics.i3d_weights."
            )
        self.device = device
        self.model = torch.jit.load(str(found), map_location=device).eval()

    @torch.no_grad()
    def __call__(self, videos: Tensor) -> Tensor:
        b, t = videos.shape[:2]
        frames = videos.reshape(b * t, *videos.shape[2:]).float()
        if frames.shape[-2:] != (224, 224):  # bilinear, no antialiasing (as the common StyleGAN-V FVD script)
            frames = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False)  # [B*T, 3, 224, 224]
        v = (frames * 2 - 1).reshape(b, t, 3, 224, 224).permute(0, 2, 1, 3, 4).contiguous()  # [B, 3, T, 224, 224]
        feats = self.model(v.to(self.device), rescale=False, resize=False, return_features=True)
        return feats.float().cpu()  # [B, D]


def frechet_distance(feats_a: np.ndarray | Tensor, feats_b: np.ndarray | Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [Na, D], [Nb, D] (Na, Nb >= 2).

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with unbiased covariances.
    """
    import scipy.linalg

    a = np.asarray(feats_a.detach().cpu() if isinstance(feats_a, Tensor) else feats_a, dtype=np.float64)
    b = np.asarray(feats_b.detach().cpu() if isinstance(feats_b, Tensor) else feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: expected [N, D] feature sets, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("frechet_distance: each set needs at least 2 samples (a covariance); "
                         "pool videos over objects and views")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    s_a, s_b = np.atleast_2d(s_a), np.atleast_2d(s_b)
    covmean = scipy.linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():
        eps = 1e-6 * np.eye(s_a.shape[0])
        covmean = scipy.linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))


def fvd_pooled(pred_videos: list[Tensor], gt_videos: list[Tensor], extractor: VideoFeatureExtractor,
               batch_size: int = 4) -> float:
    """Pooled FVD: features of every predicted and ground-truth video ([T, 3, H, W] each, one per
    (object, view)), then :func:`frechet_distance` between the two pooled sets."""
    if len(pred_videos) != len(gt_videos):
        raise ValueError(f"fvd: {len(pred_videos)} predicted vs {len(gt_videos)} ground-truth videos")

    def feats(vids: list[Tensor]) -> Tensor:
        out = [extractor(torch.stack(vids[i:i + batch_size])) for i in range(0, len(vids), batch_size)]
        return torch.cat(out)  # [N, D]

    return frechet_distance(feats(pred_videos), feats(gt_videos))


# --------------------------------------------------------------------------- suite


@dataclass
class MetricSuite:
    """The metrics of one evaluation, with the reason for each that is unavailable.

    Build with :func:`build_metric_suite`; ``definitions`` says which formulas the per-image
    metrics follow (``consistent4d``: Consistent4D's script, :mod:`d2.eval.consistent4d`;
    ``d2``: ours). :meth:`score_files` scores image files, :meth:`score_images` tensors; FVD is
    pooled (see :func:`fvd_pooled`).
    """

    requested: list[str]
    resolution: int | None = 512
    batch_size: int = 16
    device: str = "cpu"
    clip_model: torch.nn.Module | None = None  # open_clip CLIP (d2) or transformers CLIPModel (consistent4d)
    lpips_net: torch.nn.Module | None = None  # lpips package net (d2) or torchmetrics' LPIPS net (consistent4d)
    video_extractor: VideoFeatureExtractor | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    definitions: str = "consistent4d"  # image-metric formulas: "consistent4d" (the script's) or "d2"
    clip_processor: Any = None  # consistent4d: the PIL CLIPImageProcessor paired with clip_model

    @property
    def available(self) -> list[str]:
        """Requested metrics that can be computed."""
        return [m for m in self.requested if m not in self.unavailable]

    @property
    def image_metrics(self) -> list[str]:
        """Available per-image metrics (everything but FVD)."""
        return [m for m in self.available if m != "fvd"]

    def require(self, names: list[str] | tuple[str, ...]) -> None:
        """Raise :class:`MetricUnavailable` if any of ``names`` cannot be computed."""
        bad = [n for n in names if n not in ALL_METRICS]
        if bad:
            raise ValueError(f"unknown metric(s) {bad}; known: {list(ALL_METRICS)}")
        missing = [n for n in names if n not in self.available]
        if missing:
            reasons = "; ".join(f"{n}: {self.unavailable.get(n, 'not requested in metrics config')}" for n in missing)
            raise MetricUnavailable(f"required metric(s) unavailable: {reasons}")

    @torch.no_grad()
    def score_images(self, pred: Tensor, gt: Tensor) -> dict[str, Tensor]:
        """Per-pair values of every available image metric.

        Args:
            pred, gt: [N, 3, H, W] in [0, 1]. Under the ``consistent4d`` definitions they are
                first rounded to 8 bits (as a PNG stores them) and scored like files.
        Returns:
            name -> [N] float64 on CPU, plus ``psnr_capped`` -> [N] bool when PSNR is computed
            (``consistent4d``: PSNR not finite, the script's value kept).
        """
        _check_pair(pred, gt, "score_images")
        if self.definitions == "consistent4d":
            from d2.eval.consistent4d import tensor_to_pil

            return self.score_pil([tensor_to_pil(x) for x in pred], [tensor_to_pil(x) for x in gt])
        out: dict[str, list[Tensor]] = {}
        for i in range(0, pred.shape[0], self.batch_size):
            p = resize_square(pred[i:i + self.batch_size].float(), self.resolution).to(self.device)
            g = resize_square(gt[i:i + self.batch_size].float(), self.resolution).to(self.device)
            vals: dict[str, Tensor] = {}
            for m in self.image_metrics:
                if m == "psnr":
                    vals["psnr"] = psnr(p, g)
                    vals["psnr_capped"] = psnr_capped(p, g)
                elif m == "ssim":
                    vals["ssim"] = ssim(p, g)
                elif m == "lpips":
                    vals["lpips"] = lpips_distance(self.lpips_net, p, g)
                elif m == "clip":
                    vals["clip"] = clip_similarity(self.clip_model, p, g, eval_resolution=None)
            for k, v in vals.items():
                out.setdefault(k, []).append(v.detach().cpu())
        return {k: (torch.cat(v) if k == "psnr_capped" else torch.cat(v).double()) for k, v in out.items()}

    @torch.no_grad()
    def score_pil(self, pred: list, gt: list) -> dict[str, Tensor]:
        """Consistent4D definitions on PIL images (any size; RGBA put on white, resized to
        ``resolution`` by PIL bicubic: the script's 512 unless the protocol says otherwise).

        Returns:
            name -> [N] float64, plus ``psnr_capped`` -> [N] bool (PSNR not finite).
        """
        from d2.eval import consistent4d as C

        if self.definitions != "consistent4d":
            raise ValueError(f"score_pil computes the consistent4d definitions; this suite is {self.definitions!r}")
        if len(pred) != len(gt):
            raise ValueError(f"score_pil: {len(pred)} predictions vs {len(gt)} ground-truth images")
        size = self.resolution or C.SCRIPT_SIZE
        out: dict[str, list[Tensor]] = {}
        for i in range(0, len(pred), self.batch_size):
            pp = [C.script_image(x, size) for x in pred[i:i + self.batch_size]]
            gp = [C.script_image(x, size) for x in gt[i:i + self.batch_size]]
            p255, g255 = C.to_tensor255(pp), C.to_tensor255(gp)  # [B, 3, S, S] in [0, 255]
            vals: dict[str, Tensor] = {}
            for m in self.image_metrics:
                if m == "psnr":
                    vals["psnr"] = C.psnr_script(p255, g255)
                    vals["psnr_capped"] = ~torch.isfinite(vals["psnr"])
                elif m == "ssim":
                    vals["ssim"] = C.ssim_script(p255, g255)
                elif m == "lpips":  # one pair at a time, as the script (VGG features of 512 px images are large)
                    vals["lpips"] = torch.cat([C.lpips_script(self.lpips_net, p255[j:j + 1], g255[j:j + 1])
                                               for j in range(p255.shape[0])])
                elif m == "clip":
                    vals["clip"] = C.clip_script(self.clip_model, self.clip_processor, pp, gp)
            for k, v in vals.items():
                out.setdefault(k, []).append(v.detach().cpu())
        return {k: (torch.cat(v) if k == "psnr_capped" else torch.cat(v).double()) for k, v in out.items()}

    def score_files(self, pred: list[Path], gt: list[Path], background: float = 1.0) -> dict[str, Tensor]:
        """Per-pair values for image files (prediction, ground truth), under this suite's definitions.

        ``consistent4d``: the files are opened with PIL and scored as the script does
        (:meth:`score_pil`). ``d2``: loaded in [0, 1] with alpha composited on ``background``,
        resized to ``resolution`` (:meth:`score_images`).
        """
        if len(pred) != len(gt):
            raise ValueError(f"score_files: {len(pred)} predictions vs {len(gt)} ground-truth files")
        if self.definitions == "consistent4d":
            from PIL import Image

            def opened(p: Path) -> Any:
                im = Image.open(p)
                im.load()
                return im

            return self.score_pil([opened(p) for p in pred], [opened(p) for p in gt])
        from d2.utils.io import load_image

        pr = torch.stack([load_image(p, self.resolution, background) for p in pred])
        g = torch.stack([load_image(p, self.resolution, background) for p in gt])
        return self.score_images(pr, g)


def build_metric_suite(
    cfg: MetricsConfig,
    clip_model: torch.nn.Module | None = None,
    lpips_net: torch.nn.Module | None = None,
    video_extractor: VideoFeatureExtractor | None = None,
    *,
    definitions: Definitions = "consistent4d",
    clip_processor: Any = None,
) -> MetricSuite:
    """Load the networks of the requested metrics; missing weights mark a metric unavailable.

    ``definitions``: ``"consistent4d"`` (Consistent4D's script: transformers CLIP from the
    Hugging Face cache, torchmetrics LPIPS) or ``"d2"`` (open_clip CLIP, ``lpips`` LPIPS); it
    must match the protocol's ``metric_definitions`` when the suite is passed to ``evaluate``.
    ``clip_model`` (+ ``clip_processor`` for consistent4d) / ``lpips_net`` / ``video_extractor``
    inject ready networks (tests use tiny random ones); otherwise they are loaded from the
    config's weight paths.
    """
    if definitions not in ("consistent4d", "d2"):
        raise ValueError(f"unknown metric definitions {definitions!r}; known: consistent4d, d2")
    suite = MetricSuite(requested=list(dict.fromkeys(cfg.metrics)), resolution=cfg.resolution,
                        batch_size=cfg.batch_size, device=cfg.device, definitions=definitions)
    c4d = definitions == "consistent4d"
    if "clip" in suite.requested:
        try:
            if c4d:
                if clip_model is not None and clip_processor is None:
                    raise ValueError("build_metric_suite: a consistent4d clip_model needs its clip_processor")
                if clip_model is None:
                    from d2.eval.consistent4d import load_clip_script

                    clip_model, clip_processor = load_clip_script(cfg.hf_clip_model, cfg.device)
                suite.clip_processor = clip_processor
            suite.clip_model = (clip_model or load_clip_model(cfg.clip_weights, cfg.device)).to(cfg.device)
        except MetricUnavailable as e:
            suite.unavailable["clip"] = str(e)
    if "lpips" in suite.requested:
        try:
            if lpips_net is None:
                if c4d:
                    from d2.eval.consistent4d import build_lpips_script

                    lpips_net = build_lpips_script(cfg.lpips_vgg_weights, device=cfg.device)
                else:
                    lpips_net = build_lpips(cfg.lpips_vgg_weights, device=cfg.device)
            suite.lpips_net = lpips_net.to(cfg.device)
        except MetricUnavailable as e:
            suite.unavailable["lpips"] = str(e)
    if "fvd" in suite.requested:
        try:
            suite.video_extractor = video_extractor or I3DFeatures(cfg.i3d_weights, cfg.device)
        except MetricUnavailable as e:
            suite.unavailable["fvd"] = str(e)
    return suite


def parse_metric_list(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"clip,lpips"`` -> ``["clip", "lpips"]`` with validation (for ``--require-metrics``)."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [s.strip().lower() for s in items if s.strip()]
    bad = [n for n in names if n not in ALL_METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; known: {', '.join(ALL_METRICS)}")
    return names


__all__ = [
    "ALL_METRICS", "HIGHER_IS_BETTER", "METRIC_DEFINITIONS", "MetricSuite", "MetricUnavailable", "MetricsConfig",
    "I3DFeatures", "VideoFeatureExtractor", "build_lpips", "build_metric_suite", "clip_image_features",
    "clip_preprocess", "clip_similarity", "frechet_distance", "fvd_pooled", "load_clip_checkpoint", "load_clip_model",
    "lpips_distance", "metric_definitions",
    "mse", "parse_metric_list", "psnr", "psnr_capped", "resize_square", "ssim", "tiny_clip_model",
]
