"""The ``mini`` priors backend: the miniature priors trained by :mod:`d2.train.priors`.

Register it in the sampler's registry with
``register_backend("mini", "d2.train.mini:build_mini")`` (``d2.stages.priors.BACKENDS``).
It reads d2 prior folders: ``cfg.video_path`` / ``cfg.multiview_path`` when they are folders,
else ``<project>/data/priors/video`` and ``<project>/data/priors/multiview`` (committed to git).
"""

from __future__ import annotations

from pathlib import Path

import torch

from d2.stages.priors import _DTYPES, Family, MissingWeightsError, Prior, PriorsConfig, load_prior_folder

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "data" / "priors"
"""Where the trained miniature priors live in the checkout."""


def mini_prior_dir(cfg: PriorsConfig, family: Family) -> Path:
    """The folder the ``mini`` backend reads for ``family``."""
    explicit = cfg.video_path if family == "video" else cfg.multiview_path
    if explicit and Path(explicit).expanduser().is_dir():
        return Path(explicit).expanduser()
    return DEFAULT_DIR / family


def build_mini(cfg: PriorsConfig, family: Family, device: torch.device) -> Prior:
    """Backend ``mini``: the trained miniature prior of ``family``."""
    folder = mini_prior_dir(cfg, family)
    if not (folder / "d2_prior.json").is_file():
        raise MissingWeightsError(
            f"miniature {family} prior: {folder / 'd2_prior.json'} is missing.\n"
            "Train the priors with `python -m d2.train.priors --out data/priors` (or `dvc repro train_priors`).")
    return load_prior_folder(folder, family, _DTYPES[cfg.dtype], device)
