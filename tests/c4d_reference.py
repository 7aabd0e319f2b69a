"""An independent reference for the consistent4d metric definitions: Consistent4D's
evaluation/compute_image_level_metrics.py followed line by line (PIL, torchmetrics, transformers),
with a tiny random transformers CLIP instead of openai/clip-vit-base-patch32 (no downloads).

Only deviations: the ground truth's RGBA -> white step the README asks for is the script's own
``rgba=True`` branch; torchmetrics' PSNR data range, a default in the script's time, is passed as
that default's value; ``get_image_features`` of transformers 5 returns an object (its projected
``pooler_output`` is the script's tensor); the CLIP processor is the PIL one the script's
transformers had (``CLIPImageProcessorPil`` in transformers 5); SSIM is what the script's
torchmetrics (before 1.4.2) returned, the mean of the SSIM map without its 5-px border, taken
from scikit-image (float64, Gaussian weights, population statistics), which averages that same
cropped map, so that the reference does not depend on the installed torchmetrics.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.metrics import structural_similarity
from torchmetrics.functional.image import peak_signal_noise_ratio


def tiny_hf_clip(seed: int = 0):
    """A tiny random transformers CLIPModel and the PIL processor with openai/clip-vit-base-patch32's settings."""
    import transformers
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    processor = transformers.CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True)
    return model, processor


def load_and_preprocess_image(image_path, preprocess, rgba=False):
    """The script's function of that name."""
    image = Image.open(image_path)
    if rgba:
        tmp = np.array(image)
        rgb = tmp[..., :3]
        mask = tmp[..., -1]
        rgb[mask == 0] = 255
        image = Image.fromarray(rgb)
    image = image.resize((512, 512))
    image_rgb = torch.from_numpy(np.array(image)).float().permute(2, 0, 1).unsqueeze(0)
    image = preprocess(image, return_tensors="pt")
    return image, image_rgb


def ssim_script_era(pred_rgb: torch.Tensor, gt_rgb: torch.Tensor) -> float:
    """The script's ``structural_similarity_index_measure(pred, gt)`` as torchmetrics < 1.4.2 computed it:
    [1, 3, H, W] in [0, 255], data range max of the two images' max - min, window 11, sigma 1.5, the map's
    5-px border cropped before the mean (scikit-image crops the same border)."""
    data_range = float(max(pred_rgb.max() - pred_rgb.min(), gt_rgb.max() - gt_rgb.min()))
    a = pred_rgb[0].permute(1, 2, 0).double().numpy()
    b = gt_rgb[0].permute(1, 2, 0).double().numpy()
    return float(structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=data_range, K1=0.01, K2=0.03, channel_axis=-1))


def ssim_map_literal(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """SSIM map [C, H, W] (float64) of two [C, H, W] images, written from Wang et al.'s formulas: an 11-tap
    Gaussian (sigma 1.5, normalised) window over the image reflect-padded by 5 px (edge not repeated), the
    window's mean, variance and covariance, K1 = 0.01, K2 = 0.03. Every pixel has a value; torchmetrics
    >= 1.4.2 averages all of them, older releases dropped the 5-px border first."""
    r = 5
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / 1.5) ** 2)
    g /= g.sum()
    h, w = x.shape[1:]

    def blur(a: np.ndarray) -> np.ndarray:
        a = np.pad(a, ((0, 0), (r, r), (r, r)), mode="reflect")
        rows = sum(g[i] * a[:, i:i + h, :] for i in range(2 * r + 1))
        return sum(g[j] * rows[:, :, j:j + w] for j in range(2 * r + 1))

    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 / 5


def script_pair(pred_path, gt_path, model, preprocess, gt_rgba=False, lpip=None) -> dict:
    """The body of the script's frame loop for one pair: clip, ssim, psnr (tensors, as the script keeps them),
    lpips when ``lpip`` is given."""
    pred_img, pred_img_rgb = load_and_preprocess_image(pred_path, preprocess)
    gt_img, gt_img_rgb = load_and_preprocess_image(gt_path, preprocess, rgba=gt_rgba)
    pred_img = pred_img["pixel_values"]
    gt_img = gt_img["pixel_values"]
    with torch.no_grad():
        embedding_pred = _features(model.get_image_features(pred_img))
        embedding_gt = _features(model.get_image_features(gt_img))
    clip_score = torch.nn.functional.cosine_similarity(embedding_pred, embedding_gt)
    ssim = ssim_script_era(pred_img_rgb, gt_img_rgb)
    psnr = peak_signal_noise_ratio(pred_img_rgb, gt_img_rgb, data_range=gt_img_rgb.max() - gt_img_rgb.min())
    out = {"clip": clip_score.item(), "ssim": ssim, "psnr": psnr}
    if lpip is not None:
        out["lpips"] = lpip(pred_img_rgb / 127.5 - 1, gt_img_rgb / 127.5 - 1).item()
    return out


def script_main(gt_root, pred_root, model, preprocess, eval_views=4, gt_rgba=False):
    """The script's main loop (without LPIPS). Returns (result_dict, per_frame) where per_frame maps
    (object, view, frame file) -> {clip, ssim, psnr} floats."""
    gt_objects = os.listdir(gt_root)
    pred_objects = os.listdir(pred_root)
    assert len(gt_objects) == len(pred_objects), "gt and result do not match!"
    result_dict = dict(clip=dict(), psnr=dict(), ssim=dict())
    per_frame = {}
    for eval_object in gt_objects:
        object_clip = 0.
        object_psnr = 0.
        object_ssim = 0.
        for view_id in range(eval_views):
            pred_folder = os.path.join(pred_root, eval_object, f'eval_{view_id}')
            gt_folder = os.path.join(gt_root, eval_object, f'eval_{view_id}')
            pred_imgs = sorted(os.listdir(pred_folder), key=lambda i: int(i[:-4]))
            gt_imgs = sorted(os.listdir(gt_folder), key=lambda i: int(i[:-4]))
            clip_scores, ssims, psnrs = [], [], []
            for idx in range(len(pred_imgs)):
                r = script_pair(os.path.join(pred_folder, pred_imgs[idx]), os.path.join(gt_folder, gt_imgs[idx]),
                                model, preprocess, gt_rgba=gt_rgba)
                clip_scores.append(r["clip"])
                ssims.append(r["ssim"])
                psnrs.append(r["psnr"])
                per_frame[(eval_object, f"eval_{view_id}", int(pred_imgs[idx][:-4]))] = {
                    "clip": r["clip"], "ssim": float(r["ssim"]), "psnr": float(r["psnr"])}
            object_clip += np.mean(clip_scores)
            object_ssim += np.mean(ssims)
            object_psnr += np.mean(psnrs)
        result_dict["clip"][eval_object] = object_clip / 4
        result_dict["ssim"][eval_object] = object_ssim / 4
        result_dict["psnr"][eval_object] = object_psnr / 4
    for m in ("clip", "ssim", "psnr"):
        result_dict[m]["average"] = sum(v for k, v in result_dict[m].items()) / len(gt_objects)
    return result_dict, per_frame


PSNR_TOL_DB = 2e-5  # see close()
SSIM_TOL = 1e-4  # see close()


def close(metric: str, ours: float, ref: float) -> bool:
    """Equal to 1e-6; PSNR to 2e-5 dB; SSIM to 1e-4.

    The script's PSNR is float32: 10 / ln 10 * (2 ln(range) - ln(MSE)), and one float32 ulp of
    those logarithms (up to ~11 for 8-bit data) is ~1e-6, i.e. ~4e-6 dB; moreover torch's float32
    sum of squared errors over 3 x 512 x 512 values is not bit-reproducible between two calls on
    equal tensors at different addresses (observed: 1-ulp differences, up to 2e-6 dB). No
    implementation, the script included, reproduces its own PSNR to 1e-6 dB; 2e-5 dB is ~5 such ulps.
    The script's SSIM is float32 too (second moments of [0, 255] images, up to 65025, whose ulp is
    ~0.004, against c2 = (0.03 x data range)^2, 11 for a range of 110) and the reference's is
    scikit-image's float64: they differ by float32 rounding (observed up to 5e-5 at 512 px on a
    low-contrast pair); that ours repeats the float32 arithmetic itself is tested bit for bit
    against torchmetrics' SSIM map (test_metrics.py).
    """
    if metric == "psnr":
        return abs(ours - ref) <= PSNR_TOL_DB
    if metric == "ssim":
        return abs(ours - ref) <= SSIM_TOL
    return abs(ours - ref) <= 1e-6


def write_tree(root: Path, objects: list[str], frames: int, seed: int = 0) -> tuple[Path, Path]:
    """gt/<o>/eval_k/<i>.png (RGBA, transparent background, sizes vary by object) and pred/<o>/eval_k/<i>.png
    (RGB on white) for a golden test of the whole evaluation."""
    rng = np.random.default_rng(seed)
    gt, pred = root / "gt" / "gt", root / "pred"
    for oi, o in enumerate(objects):
        size = 20 + 12 * oi
        for k in range(4):
            for f in range(frames):
                for base, rgba in ((gt, True), (pred, False)):
                    d = base / o / f"eval_{k}"
                    d.mkdir(parents=True, exist_ok=True)
                    low = rng.integers(0, 256, (3, 3, 3)).astype(np.float32)
                    img = np.array(Image.fromarray(low.astype(np.uint8)).resize((size, size),
                                                                                Image.Resampling.BILINEAR))
                    img = np.clip(img.astype(np.int32) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
                    alpha = np.zeros((size, size), np.uint8)
                    lo, hi = size // 5 + f + k % 2, size - size // 5 - oi
                    alpha[lo:hi, lo:hi] = 255
                    alpha[lo - 1, lo:hi] = 100  # a partly transparent edge row
                    if rgba:
                        Image.fromarray(np.dstack([img, alpha])).save(d / f"{f}.png")
                    else:
                        Image.fromarray(np.where(alpha[..., None] > 0, img, 255).astype(np.uint8)).save(d / f"{f}.png")
    return root / "gt", pred
