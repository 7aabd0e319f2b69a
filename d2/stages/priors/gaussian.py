"""The ``gaussian`` backend: an analytic prior whose denoiser is known in closed form (proves the sampler)."""

from __future__ import annotations

import torch
from torch import Tensor

from d2.stages.priors.base import Family, PixelSpaceVAE, Prior, PriorCondition
from d2.stages.priors.config import GaussianPriorConfig, PriorsConfig


class GaussianPrior(Prior):
    """Analytic prior: x0 of a sequence ~ N(m, std^2 R (x) I), R_ij = rho^|i-j| along T.

    Conditional mean ``m = offset + cond_weight * concat`` (the latent of the conditioning
    image, repeated over T); unconditional ``m = offset``. D is the posterior mean
    ``m + A (x - m)`` with ``A = S (S + sigma^2 I)^-1`` along T, computed in float64.
    Pixel space (3 channels, scale factor 1).
    """

    def __init__(self, family: Family, cfg: GaussianPriorConfig) -> None:
        super().__init__(family, None, PixelSpaceVAE(), None, None, cfg.resolution, name=f"gaussian-{family}")
        self.cfg = cfg
        self.rho = cfg.video_rho if family == "video" else cfg.multiview_rho
        self.offset = cfg.video_offset if family == "video" else cfg.multiview_offset

    @property
    def default_num_frames(self) -> int:
        return 8

    def covariance(self, t: int) -> Tensor:
        """[T, T] float64 covariance along the sequence axis."""
        i = torch.arange(t, dtype=torch.float64)
        return self.cfg.std**2 * self.rho ** (i[:, None] - i[None, :]).abs()

    def clip_embed(self, images: Tensor) -> Tensor:
        return torch.zeros(images.shape[0], 1, 1, device=self.device)

    def mean(self, cond: PriorCondition) -> Tensor:
        """[B, 1, C, h, w] conditional mean (the unconditional branch has concat = 0)."""
        return self.offset + self.cfg.cond_weight * cond.concat.float()[:, None]

    def denoise_raw(self, x: Tensor, sigma: Tensor, cond: PriorCondition) -> Tensor:
        b, t = x.shape[:2]
        cov = self.covariance(t).to(x.device)  # [T, T]
        eye = torch.eye(t, dtype=torch.float64, device=x.device)
        s2 = sigma.to(torch.float64).view(b, 1, 1) ** 2
        a = torch.linalg.solve(cov[None] + s2 * eye, cov[None].expand(b, t, t)).transpose(1, 2)  # S (S+s2)^-1
        m = self.mean(cond).to(torch.float64)
        r = x.to(torch.float64) - m
        return (m + torch.einsum("bts,bs...->bt...", a, r)).float()


def build_gaussian(cfg: PriorsConfig, family: Family, device: torch.device) -> Prior:
    """The analytic Gaussian prior of ``cfg.gaussian``."""
    return GaussianPrior(family, cfg.gaussian).to(device)
