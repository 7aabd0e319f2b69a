"""The ``mini`` backend: the miniature priors trained on the procedural world (:mod:`d2.train.priors`)."""

from __future__ import annotations

from pathlib import Path

import torch

from d2.stages.priors.base import DTYPES, Family, MissingWeightsError, Prior
from d2.stages.priors.config import PriorsConfig
from d2.stages.priors.folder import load_prior_folder

MINI_DIR = Path(__file__).resolve().parents[3] / "data" / "priors"
"""Where the trained miniature priors live in the checkout (committed to git)."""


def mini_prior_dir(cfg: PriorsConfig, family: Family) -> Path:
    """The folder the ``mini`` backend reads for ``family``: ``cfg.{video,multiview}_path`` when it
    is a folder, else ``data/priors/{video,multiview}`` of the checkout."""
    explicit = cfg.video_path if family == "video" else cfg.multiview_path
    if explicit and Path(explicit).expanduser().is_dir():
        return Path(explicit).expanduser()
    return MINI_DIR / family


def build_mini(cfg: PriorsConfig, family: Family, device: torch.device) -> Prior:
    """Backend ``mini``: the trained miniature prior of ``family``."""
    folder = mini_prior_dir(cfg, family)
    if not (folder / "d2_prior.json").is_file():
        raise MissingWeightsError(
            f"miniature {family} prior: {folder / 'd2_prior.json'} is missing.\n"
            "Train the priors with `python -m d2.train.priors --out data/priors` (or `dvc repro train_priors`).")
    return load_prior_folder(folder, family, DTYPES[cfg.dtype], device)
