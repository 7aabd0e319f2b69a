"""Training of the miniature video and multi-view priors.

Both priors are :class:`d2.stages.priors.Prior` objects built from small configs of the real
families (diffusers ``UNetSpatioTemporalConditionModel`` for the video prior, the sampler's
:class:`d2.stages.sv3d.SV3DUNet` for the multi-view prior, a tiny
``CLIPVisionModelWithProjection`` image encoder each, :class:`PixelSpaceVAE`), and are trained
through the very code the sampler calls (``Prior.condition`` and ``Prior.denoise_raw``), so the
conditioning seen in training is the conditioning used at sampling time by construction.

Objective (EDM, Karras et al. 2022, with the sampler's sigma_data = 1 preconditioning):
``sigma`` is log-normal (``p_mean``, ``p_std``) mixed with a log-uniform share over the
sampler's whole range [0.002, 700]; ``x = x0 + sigma n``; loss
``lambda(sigma) |D(x; sigma) - x0|^2`` with ``lambda = (sigma^2 + 1) / sigma^2``, i.e. unit
weight on the network's v-prediction target. Classifier-free guidance: with probability
``p_uncond`` an element gets the sampler's unconditional branch (CLIP context and concatenated
image zeroed, vector ids kept).

Command::

    python -m d2.train.priors --out data/priors [--device cpu|cuda] [--steps N] [--max-minutes M]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from d2.stages.cameras import orbit_azimuths
from d2.stages.priors import (Family, PixelSpaceVAE, Prior, PriorCondition, load_prior_folder,
                              save_prior_folder, spatiotemporal_unet_config)

SIGMA_MIN, SIGMA_MAX = 0.002, 700.0  # the sampler's Karras range (docs/method.md)


# ---------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------


class MiniModelConfig(BaseModel):
    """Sizes of one miniature prior (both families share them)."""

    model_config = ConfigDict(extra="forbid")
    resolution: int = 16  # image side in pixels (pixel space: latent = image in [-1, 1])
    num_frames: int = 8  # sequence length the UNet is built for (F frames / V views)
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # UNet widths per level (multiples of 32: GroupNorm)
    attention_from_level: int = 1  # levels >= this one have (spatial + temporal) attention; 0 = all
    layers_per_block: int = 1  # resnets per UNet level
    num_attention_heads: int = 2  # heads of every UNet attention
    cross_attention_dim: int = 32  # CLIP projection width = UNet context width
    addition_time_embed_dim: int = 32  # sinusoidal width per added id (SV3D camera ids get 2x)
    clip_hidden_size: int = 32  # tiny CLIP vision width
    clip_layers: int = 2  # tiny CLIP vision depth
    clip_patch_size: int = 4  # tiny CLIP patch side (the CLIP input side is the prior's resolution)


class TrainConfig(BaseModel):
    """Knobs of one training run of both priors."""

    model_config = ConfigDict(extra="forbid")
    model: MiniModelConfig = Field(default_factory=MiniModelConfig)  # architecture
    steps: int = 2000  # optimizer steps per prior (a time budget may stop earlier)
    max_minutes: float | None = None  # wall-clock budget for both priors together (split evenly); None: none
    batch_size: int = 8  # sequences per step
    lr: float = 3e-4  # AdamW learning rate (after warm-up)
    warmup_steps: int = 100  # linear warm-up of the learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm
    ema_decay: float = 0.999  # EMA of the weights (what is saved); ramps up as min(decay, (1+n)/(10+n))
    p_mean: float = -0.4  # mean of log(sigma) of the log-normal share
    p_std: float = 1.4  # std of log(sigma) of the log-normal share
    uniform_share: float = 0.15  # share of sigmas drawn log-uniform over [0.002, 700] (the sampler's range)
    p_uncond: float = 0.1  # probability of the unconditional branch (for classifier-free guidance)
    cond_aug_max: float = 0.1  # cond_aug of a step ~ U[0, cond_aug_max] (noise on the concatenated image)
    augment: bool = True  # mirror augmentation (both; orbits re-ordered) and time reversal (videos), p = 0.5 each
    seed: int = 0  # seed of weights, batches and noise
    device: str = "cpu"  # torch device
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast (weights, x and the loss stay fp32)
    threads: int = 1  # torch CPU threads
    log_every: int = 20  # steps between MLflow metric points
    families: tuple[Family, ...] = ("video", "multiview")  # which priors to train
    progress: bool = True  # tqdm progress bars
    save_fp16: bool = True  # store the weights in fp16 (half the size; loaders upcast to their dtype)


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------


def mini_unet_config(m: MiniModelConfig, family: Family) -> dict[str, Any]:
    """diffusers UNet config of a miniature prior (pixel space: 3 latent channels, 3 concatenated)."""
    n = len(m.block_out_channels)
    if any(c % 32 for c in m.block_out_channels):
        raise ValueError(f"block_out_channels must be multiples of 32 (GroupNorm), got {m.block_out_channels}")
    if m.resolution % (2 ** (n - 1)):
        raise ValueError(f"resolution {m.resolution} must be divisible by 2^(levels-1) = {2 ** (n - 1)}")
    return spatiotemporal_unet_config(
        family=family, latent_channels=3, block_out_channels=m.block_out_channels,
        attention=[i >= m.attention_from_level for i in range(n)],
        addition_time_embed_dim=m.addition_time_embed_dim, layers_per_block=m.layers_per_block,
        cross_attention_dim=m.cross_attention_dim, num_attention_heads=m.num_attention_heads,
        num_frames=m.num_frames, sample_size=m.resolution,
    )


def build_mini_prior(m: MiniModelConfig, family: Family, seed: int = 0) -> Prior:
    """A freshly initialised miniature prior of ``family`` (seeded, CPU, fp32)."""
    from diffusers import UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from d2.stages.sv3d import SV3DUNet

    if m.resolution % m.clip_patch_size:
        raise ValueError(f"resolution {m.resolution} must be divisible by clip_patch_size {m.clip_patch_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_cls = UNetSpatioTemporalConditionModel if family == "video" else SV3DUNet
        unet = unet_cls(**mini_unet_config(m, family))
        clip_cfg = CLIPVisionConfig(
            hidden_size=m.clip_hidden_size, projection_dim=m.cross_attention_dim, num_hidden_layers=m.clip_layers,
            num_attention_heads=2, intermediate_size=2 * m.clip_hidden_size, image_size=m.resolution,
            patch_size=m.clip_patch_size,
        )
        encoder = CLIPVisionModelWithProjection(clip_cfg)
    fe = CLIPImageProcessor(crop_size=m.resolution, size={"shortest_edge": m.resolution})
    return Prior(family, unet, PixelSpaceVAE(), encoder, fe, m.resolution, name=f"mini-{family}")


def num_parameters(prior: Prior) -> int:
    """Trainable parameter count of a prior (UNet + image encoder)."""
    return sum(p.numel() for p in prior.parameters())


# ---------------------------------------------------------------------------------------
# one training step
# ---------------------------------------------------------------------------------------


def sample_sigmas(n: int, cfg: TrainConfig, generator: torch.Generator) -> Tensor:
    """[n] training noise levels: log-normal, with a log-uniform share over the sampler's range."""
    log_normal = torch.randn(n, generator=generator) * cfg.p_std + cfg.p_mean
    log_unif = torch.rand(n, generator=generator) * (math.log(SIGMA_MAX) - math.log(SIGMA_MIN)) + math.log(SIGMA_MIN)
    use_unif = torch.rand(n, generator=generator) < cfg.uniform_share
    return torch.where(use_unif, log_unif, log_normal).exp()


def make_condition(prior: Prior, cond_images: Tensor, num_frames: int, cond_aug: float,
                   elevations_deg: Tensor | None, generator: torch.Generator, drop: Tensor) -> PriorCondition:
    """The sampler's conditioning of a training batch.

    cond_images: [B, 3, H, W] in [0, 1] (video: first frame; multi-view: the input view).
    elevations_deg: [B] (multi-view only): the orbit's elevation of each element.
    drop: [B] bool: elements that get the unconditional branch (context and concat zeroed).
    Video ids are drawn per element (fps_id ~ U{4..30}, motion_bucket_id ~ U{0..255}), so the
    model learns not to depend on them and any value the sampler passes is in distribution.
    """
    b = cond_images.shape[0]
    if prior.family == "video":
        cond = prior.condition(cond_images, cond_aug=cond_aug, generator=generator)
        ids = cond.added_ids.clone()  # [B, 3] (fps, motion, cond_aug)
        ids[:, 0] = torch.randint(4, 31, (b,), generator=generator).float().to(ids.device)
        ids[:, 1] = torch.randint(0, 256, (b,), generator=generator).float().to(ids.device)
    else:
        if elevations_deg is None:
            raise ValueError("the multi-view prior needs elevations_deg")
        cond = prior.condition(cond_images, cond_aug=cond_aug, azimuths_deg=orbit_azimuths(num_frames),
                               elevations_deg=0.0, generator=generator)
        ids = cond.added_ids.clone()  # [B, T, 3] (cond_aug, polar, azimuth)
        polar = torch.deg2rad(90.0 - elevations_deg.float()).to(ids.device)  # [B]
        ids[:, :, 1] = polar[:, None]
    keep = (~drop).to(cond.context.device, torch.float32)
    return PriorCondition(context=cond.context * keep.view(b, 1, 1), concat=cond.concat * keep.view(b, 1, 1, 1),
                          added_ids=ids)


def edm_loss(prior: Prior, x0: Tensor, cond: PriorCondition, sigma: Tensor, noise: Tensor) -> Tensor:
    """EDM-weighted denoising loss (scalar) through ``Prior.denoise_raw``.

    x0: [B, T, 3, H, W] clean sequences in [-1, 1]; sigma: [B]; noise: like x0.
    """
    x = x0 + sigma.view(-1, 1, 1, 1, 1) * noise
    d = prior.denoise_raw(x, sigma, cond)  # [B, T, 3, H, W] fp32
    weight = (sigma**2 + 1.0) / sigma**2  # EDM lambda with sigma_data = 1
    per_elem = ((d - x0) ** 2).mean(dim=(1, 2, 3, 4))  # [B]
    return (weight * per_elem).mean()


class EMA:
    """Exponential moving average of a module's parameters (and a copy of its buffers)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadow = list(self.shadow.parameters())
        live = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(shadow, live, 1.0 - d)


def _batch(data: Tensor, idx: Tensor, device: torch.device) -> Tensor:
    """uint8 [N, T, 3, H, W] rows ``idx`` -> float [B, T, 3, H, W] in [0, 1] on ``device``."""
    return data[idx].to(device, non_blocking=True).float() / 255.0


def mirror_orbit_order(num_views: int) -> list[int]:
    """View order of a mirrored SV3D orbit: relative azimuth +a becomes -a, the input view stays last.

    Mirrored view v (at (v+1)*360/V) shows the mirror image of original view V-2-v.
    """
    return [num_views - 2 - v for v in range(num_views - 1)] + [num_views - 1]


def augment_batch(seq: Tensor, family: Family, generator: torch.Generator) -> Tensor:
    """Random mirror (and, for videos, time reversal) of [B, T, 3, H, W] sequences; both are valid data.

    A mirrored video is a video of the mirrored scene; a reversed video is a video of the reversed
    motion (frame 0, the condition, becomes the old last frame). A mirrored orbit is the mirrored
    scene's orbit once its views are re-ordered (:func:`mirror_orbit_order`).
    """
    b, t = seq.shape[:2]
    flip = torch.rand(b, generator=generator) < 0.5
    out = seq.clone()
    if bool(flip.any()):
        f = out[flip.to(seq.device)].flip(-1)
        if family == "multiview":
            f = f[:, mirror_orbit_order(t)]
        out[flip.to(seq.device)] = f
    if family == "video":
        rev = (torch.rand(b, generator=generator) < 0.5).to(seq.device)
        if bool(rev.any()):
            out[rev] = out[rev].flip(1)
    return out


def train_prior(
    family: Family,
    sequences: Tensor,
    cfg: TrainConfig,
    elevations_deg: Tensor | None = None,
    deadline: float | None = None,
    logger: "MetricLogger | None" = None,
    prior: Prior | None = None,
) -> tuple[Prior, dict[str, Any]]:
    """Train one prior on ``sequences`` and return (EMA prior on CPU, summary).

    sequences: uint8 [N, T, 3, H, W]: videos (frame 0 is the condition) for ``video``, orbits at
    the SV3D azimuths (the last view is the input view / condition) for ``multiview``.
    elevations_deg: [N] orbit elevations (multi-view). ``deadline``: ``time.time()`` to stop at.
    """
    from tqdm.auto import tqdm

    if sequences.dtype != torch.uint8 or sequences.ndim != 5 or sequences.shape[2] != 3:
        raise ValueError(f"sequences must be uint8 [N, T, 3, H, W], got {sequences.dtype} {tuple(sequences.shape)}")
    n, t, _, h, w = sequences.shape
    if (h, w) != (cfg.model.resolution, cfg.model.resolution):
        raise ValueError(f"sequences are {h}x{w}, the model is {cfg.model.resolution}px")
    if family == "multiview" and (elevations_deg is None or elevations_deg.shape != (n,)):
        raise ValueError("multi-view training needs elevations_deg [N]")
    device = torch.device(cfg.device)
    seed = cfg.seed + (0 if family == "video" else 1000)
    gen = torch.Generator().manual_seed(seed)
    prior = prior if prior is not None else build_mini_prior(cfg.model, family, seed=seed)
    prior = prior.to(device).train()
    ema = EMA(prior, cfg.ema_decay)
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    data = sequences.pin_memory() if device.type == "cuda" else sequences
    elev = elevations_deg.float() if elevations_deg is not None else None
    use_bf16 = cfg.precision == "bf16"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    losses: list[float] = []
    t0 = time.time()
    step = 0
    bar = tqdm(total=cfg.steps, desc=f"train {family}", disable=not cfg.progress, dynamic_ncols=True)
    for step in range(1, cfg.steps + 1):
        if deadline is not None and time.time() > deadline:
            step -= 1
            break
        lr = cfg.lr * min(1.0, step / max(1, cfg.warmup_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        seq = _batch(data, idx, device)  # [B, T, 3, H, W] in [0, 1]
        if cfg.augment:
            seq = augment_batch(seq, family, gen)
        cond_img = seq[:, 0] if family == "video" else seq[:, -1]  # [B, 3, H, W]
        cond_aug = float(torch.rand((), generator=gen)) * cfg.cond_aug_max
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.p_uncond
        sigma = sample_sigmas(cfg.batch_size, cfg, gen).to(device)
        noise = torch.randn(seq.shape, generator=gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            cond = make_condition(prior, cond_img, t, cond_aug, elev[idx] if elev is not None else None, gen, drop)
            loss = edm_loss(prior, seq * 2 - 1, cond, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(prior.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(prior)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"{family} prior: loss became {lv} at step {step}")
        losses.append(lv)
        bar.update(1)
        if step % cfg.log_every == 0 or step == 1:
            recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
            bar.set_postfix(loss=f"{recent:.4f}")
            if not cfg.progress and (step % (cfg.log_every * 10) == 0 or step == 1):
                print(f"[{family}] step {step} loss {recent:.4f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
            if logger is not None:
                logger.log({f"{family}/loss": recent, f"{family}/grad_norm": float(gnorm), f"{family}/lr": lr}, step)
    bar.close()
    elapsed = time.time() - t0
    out = ema.shadow.to("cpu").float().eval()
    tail = losses[-max(1, min(100, len(losses) // 5)):] if losses else [float("nan")]
    summary = {
        "family": family, "steps": step, "seconds": round(elapsed, 1), "sequences": n,
        "loss_first": losses[0] if losses else float("nan"), "loss_last_mean": sum(tail) / len(tail),
        "params": num_parameters(out),
    }
    return out, summary


def save_mini_prior(prior: Prior, folder: str | os.PathLike, extra: dict[str, Any] | None = None,
                    half: bool = True) -> Prior:
    """Save a trained prior as a d2 prior folder; with ``half`` the weights are stored in fp16.

    The in-memory prior's weights are rounded to fp16 as well (and kept in fp32), so it and
    the reloaded folder give identical outputs. Returns ``prior``.
    """
    if half:
        for mod in (prior.unet, prior.image_encoder):
            mod.to(torch.float16)
    try:
        save_prior_folder(prior, folder, extra=extra)
    finally:
        for mod in (prior.unet, prior.image_encoder):
            mod.to(torch.float32)
    return prior


# ---------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------


class MetricLogger:
    """MLflow curves (local sqlite store of :mod:`d2.execution.env`) with explicit run ids; no-op when off."""

    def __init__(self, enabled: bool, experiment: str, run_name: str, params: dict[str, Any]) -> None:
        self.client = None
        self.run_id = ""
        if not enabled:
            return
        try:
            self._start(experiment, run_name, params)
        except Exception as e:  # noqa: BLE001  (tracking must never stop a training run)
            import warnings

            warnings.warn(f"MLflow logging disabled: {type(e).__name__}: {e}")
            self.client = None

    def _start(self, experiment: str, run_name: str, params: dict[str, Any]) -> None:
        from d2.env import project_root, setup_env

        setup_env()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            loc = Path(os.environ.get("D2_MLFLOW_ARTIFACTS", project_root() / "mlruns")) / experiment
            try:
                exp_id = client.create_experiment(experiment, artifact_location=loc.as_uri())
            except Exception:  # noqa: BLE001 (created meanwhile by another process)
                exp_id = client.get_experiment_by_name(experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        self.run_id = client.create_run(exp_id, run_name=run_name).info.run_id
        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(self.run_id, params=items[i:i + 100])
        self.client = client

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log finite metrics at ``step``."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if math.isfinite(float(v))]
        if items:
            try:
                self.client.log_batch(self.run_id, metrics=items)
            except Exception as e:  # noqa: BLE001
                import warnings

                warnings.warn(f"MLflow logging stopped: {e}")
                self.client = None

    def finish(self, ok: bool) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


def _flat(prefix: str, obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(f"{prefix}{k}.", v))
        return out
    return {prefix.rstrip("."): obj}


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------


def train_priors(out_dir: str | os.PathLike, cfg: TrainConfig, data_cfg: "DataConfig | None" = None,
                 mlflow: bool = True, dataset_path: str | os.PathLike | None = None,
                 init_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Build (or load the cached) training set, train the priors of ``cfg.families``, save them.

    Writes ``<out_dir>/video`` and ``<out_dir>/multiview`` (d2 prior folders: the ``mini``
    backend and the ``svd`` / ``sv3d_p`` loaders read them) and ``<out_dir>/train.json``.
    ``dataset_path``: a rendered training set file (``.d2cache/train/<key>.pt``) used as is.
    ``init_dir``: continue from the priors saved there (``<init_dir>/{video,multiview}``).
    """
    from d2.train.data import DataConfig, load_or_build_dataset
    from d2.utils.io import write_json

    data_cfg = data_cfg or DataConfig(resolution=cfg.model.resolution, num_frames=cfg.model.num_frames)
    if data_cfg.resolution != cfg.model.resolution or data_cfg.num_frames != cfg.model.num_frames:
        raise ValueError(f"data ({data_cfg.resolution}px, {data_cfg.num_frames} frames) and model "
                         f"({cfg.model.resolution}px, {cfg.model.num_frames} frames) disagree")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir)
    t_start = time.time()
    if dataset_path is not None:
        from d2.train.data import TrainingSet
        from d2.utils.io import load_tensor

        ds = TrainingSet(**load_tensor(dataset_path))
        res, frames = ds.videos.shape[-1], ds.videos.shape[1]
        if (res, frames) != (cfg.model.resolution, cfg.model.num_frames):
            raise ValueError(f"{dataset_path}: {res}px x {frames} frames, the model wants "
                             f"{cfg.model.resolution}px x {cfg.model.num_frames}")
        data_cfg = data_cfg.model_copy(update={"num_scenes": int(ds.scene_seeds.numel())})
    else:
        ds = load_or_build_dataset(data_cfg, progress=cfg.progress)
    t_data = time.time() - t_start
    params = {**_flat("train.", cfg.model_dump(exclude={"model"})), **_flat("model.", cfg.model.model_dump()),
              **_flat("data.", data_cfg.model_dump())}
    logger = MetricLogger(mlflow, "miniature-priors", f"train-{cfg.device}-{cfg.seed}", params)
    deadline_total = t_start + 60 * cfg.max_minutes if cfg.max_minutes is not None else None
    summaries: dict[str, Any] = {"data_seconds": round(t_data, 1), "dataset": ds.summary()}
    ok = False
    try:
        fams = list(cfg.families)
        for i, family in enumerate(fams):
            deadline = None
            if deadline_total is not None:  # split what is left evenly over the priors still to train
                deadline = time.time() + (deadline_total - time.time()) / (len(fams) - i)
            seqs = ds.videos if family == "video" else ds.orbits
            elev = None if family == "video" else ds.orbit_elevations
            init = None
            if init_dir is not None:
                init = load_prior_folder(Path(init_dir) / family, family)
                if init.resolution != cfg.model.resolution:
                    raise ValueError(f"{init_dir}/{family} is {init.resolution}px, the run is {cfg.model.resolution}px")
            prior, summary = train_prior(family, seqs, cfg, elev, deadline, logger, prior=init)
            summary["init"] = str(init_dir) if init_dir is not None else None
            extra = {
                "trained_by": "d2.train.priors", "num_frames": cfg.model.num_frames, "summary": summary,
                "train": cfg.model_dump(mode="json"), "data": data_cfg.model_dump(mode="json"),
            }
            save_mini_prior(prior, out_dir / family, extra=extra, half=cfg.save_fp16)
            summaries[family] = summary
            logger.log({f"{family}/final_loss": summary["loss_last_mean"], f"{family}/seconds": summary["seconds"]},
                       summary["steps"])
        ok = True
    finally:
        logger.finish(ok)
    summaries["total_seconds"] = round(time.time() - t_start, 1)
    summaries["mlflow_run_id"] = logger.run_id
    write_json(out_dir / "train.json", {"config": cfg.model_dump(mode="json"), "data": data_cfg.model_dump(mode="json"),
                                        "results": summaries})
    return summaries


def _parse(argv: list[str] | None = None) -> tuple[str, TrainConfig, "DataConfig", bool, str | None, str | None]:
    from d2.train.data import DataConfig

    p = argparse.ArgumentParser(prog="python -m d2.train.priors", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/priors", help="output folder (video/ and multiview/ prior folders)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:0 ...")
    p.add_argument("--steps", type=int, default=TrainConfig().steps, help="optimizer steps per prior")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget for everything")
    p.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig().lr)
    p.add_argument("--ema-decay", type=float, default=TrainConfig().ema_decay)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--resolution", type=int, default=MiniModelConfig().resolution)
    p.add_argument("--frames", type=int, default=MiniModelConfig().num_frames, help="F = V of the training sequences")
    p.add_argument("--channels", default=",".join(map(str, MiniModelConfig().block_out_channels)),
                   help="UNet widths per level, comma separated")
    p.add_argument("--scenes", type=int, default=DataConfig().num_scenes, help="training scenes to render")
    p.add_argument("--dataset", default=None, help="a rendered training set file (.d2cache/train/*.pt) to use as is")
    p.add_argument("--init", default=None, help="continue from the priors in this folder ({video,multiview}/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--families", default="video,multiview")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    model = MiniModelConfig(resolution=a.resolution, num_frames=a.frames,
                            block_out_channels=tuple(int(c) for c in a.channels.split(",")))
    cfg = TrainConfig(model=model, steps=a.steps, max_minutes=a.max_minutes, batch_size=a.batch_size, lr=a.lr,
                      ema_decay=a.ema_decay, precision=a.precision, seed=a.seed, device=a.device, threads=a.threads,
                      families=tuple(a.families.split(",")), progress=not a.no_progress)
    data = DataConfig(resolution=a.resolution, num_frames=a.frames, num_scenes=a.scenes)
    return a.out, cfg, data, not a.no_mlflow, a.dataset, a.init


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m d2.train.priors``."""
    out, cfg, data, mlflow, dataset, init = _parse(argv)
    result = train_priors(out, cfg, data, mlflow=mlflow, dataset_path=dataset, init_dir=init)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
