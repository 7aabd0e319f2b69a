"""The evaluation protocol as data (recorded in every results file).

Consistent4D's video-to-4D protocol: the input video is seen from azimuth 0; a method's 4D
output is rendered at azimuths -75, 15, 105, 195 (elevation 0) for every frame and compared
with the ground-truth renders ``gt/<object>/eval_{0..3}/<i>.png``. Consistent4D scores 32
frames; Diffusion² scored the first 25 and also the front view (the input frames), so
:meth:`Protocol.paper` differs from :meth:`Protocol.consistent4d` in those two fields.
Aggregation: mean over frames, then over views, then over objects (FVD: pooled over all
(object, view) videos, one number per benchmark).

Metric definitions (``metric_definitions``): ``consistent4d`` computes what Consistent4D's
``evaluation/compute_image_level_metrics.py`` computes (images resized to 512 by PIL bicubic,
torchmetrics PSNR / LPIPS, SSIM as the torchmetrics of the script's time averaged it (the
SSIM map without its 5-px border), transformers CLIP; :mod:`d2.eval.consistent4d`): the only
definitions under which published Consistent4D-benchmark numbers compare. ``d2`` is our own
cleaner set (:mod:`d2.eval.metrics`), preset :meth:`Protocol.d2_clean`. The script divides
the sum of its 4 views' means by 4; we take the mean over views, the same number for 4 views.
FVD is our pooled FVD under both (see ``d2.eval.metrics.FVD_DEFINITION`` for what the
script's ``compute_fvd.py`` computes instead).

The front view, when included, is the view ``front``: the prediction's
``<object>/front/<i>.png`` against the ground truth's input frames ``input/<object>/<i>.png``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_EVAL_AZIMUTHS: tuple[float, ...] = (-75.0, 15.0, 105.0, 195.0)
FRONT_VIEW = "front"  # name of the front (input) view in prediction folders
SCRIPT_RESOLUTION = 512  # Consistent4D's evaluation script resizes every image to this size


class Protocol(BaseModel):
    """How a benchmark is scored."""

    model_config = ConfigDict(extra="forbid")

    name: str = "consistent4d"  # label printed with the results
    input_azimuth_deg: float = 0.0  # azimuth of the input video (the front view)
    eval_azimuths_deg: list[float] = Field(default_factory=lambda: list(DEFAULT_EVAL_AZIMUTHS))  # views eval_0..eval_{K-1}
    elevation_deg: float = 0.0  # elevation of every evaluation camera
    include_front_view: bool = False  # also score the front view (prediction `front/` vs the input frames)
    num_frames: int | None = Field(32, ge=1)  # score frames 0..num_frames-1 (None: every frame present)
    background: Literal["white", "black"] = "white"  # background the renders are composited on
    resolution: int = Field(512, ge=16)  # images are resized to this square size before every metric (the consistent4d definitions: 512, as the script)
    metric_definitions: Literal["consistent4d", "d2"] = "consistent4d"  # image-metric formulas: Consistent4D's evaluation script, or our own (d2)
    aggregation: tuple[Literal["frames"], Literal["views"], Literal["objects"]] = ("frames", "views", "objects")  # mean order (fixed)

    @field_validator("eval_azimuths_deg")
    @classmethod
    def _nonempty(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("eval_azimuths_deg must not be empty")
        return v

    @model_validator(mode="after")
    def _script_background(self) -> "Protocol":
        if self.metric_definitions == "consistent4d" and self.background != "white":
            raise ValueError("the consistent4d metric definitions put images on white (as the script's README "
                             "requires); use background: white or metric_definitions: d2")
        return self

    @classmethod
    def consistent4d(cls, **kw) -> "Protocol":
        """Consistent4D's protocol: 4 novel views, 32 frames, no front view, the script's metrics at 512 px."""
        return cls(**kw)

    @classmethod
    def d2_clean(cls, **kw) -> "Protocol":
        """Consistent4D's views and frames with our own metric definitions (not comparable with published rows)."""
        base = dict(name="d2-clean", metric_definitions="d2")
        base.update(kw)
        return cls(**base)

    def compares_with_published(self) -> bool:
        """Whether the image metrics are computed as Consistent4D's script computes them (its
        definitions at its 512 px): the condition for printing published rows beside ours."""
        return self.metric_definitions == "consistent4d" and self.resolution == SCRIPT_RESOLUTION

    @classmethod
    def paper(cls, **kw) -> "Protocol":
        """The protocol Diffusion² reported: first 25 frames, front view included."""
        base = dict(name="diffusion2-paper", num_frames=25, include_front_view=True)
        base.update(kw)
        return cls(**base)

    def view_names(self) -> list[str]:
        """Folders of the scored views: ``eval_0..eval_{K-1}`` (+ ``front``)."""
        names = [f"eval_{k}" for k in range(len(self.eval_azimuths_deg))]
        return names + ([FRONT_VIEW] if self.include_front_view else [])

    def view_azimuths(self) -> dict[str, float]:
        """View folder -> azimuth in degrees."""
        out = {f"eval_{k}": float(a) for k, a in enumerate(self.eval_azimuths_deg)}
        if self.include_front_view:
            out[FRONT_VIEW] = float(self.input_azimuth_deg)
        return out

    def describe(self) -> str:
        """One paragraph for table footers."""
        views = ", ".join(f"{k} = {a:g} deg" for k, a in self.view_azimuths().items())
        frames = "all frames present" if self.num_frames is None else f"the first {self.num_frames} frames"
        if self.metric_definitions == "consistent4d":
            from d2.eval.consistent4d import SSIM_DEFINITION_SHORT

            defs = ("metric definitions 'consistent4d': Consistent4D's compute_image_level_metrics.py (RGBA put on "
                    f"white, PIL bicubic to {self.resolution}x{self.resolution}, torchmetrics PSNR/LPIPS, "
                    f"{SSIM_DEFINITION_SHORT}, transformers CLIP)")
            if self.resolution != SCRIPT_RESOLUTION:
                defs += f"; NOT the script's numbers: it resizes to {SCRIPT_RESOLUTION}x{SCRIPT_RESOLUTION}"
        else:
            defs = (f"metric definitions 'd2' (ours; not comparable with published Consistent4D numbers): images "
                    f"resized to {self.resolution}x{self.resolution}")
        return (f"Protocol '{self.name}': input video at azimuth {self.input_azimuth_deg:g} deg; scored views "
                f"{views} (elevation {self.elevation_deg:g} deg); {frames}; {self.background} background; {defs}; "
                f"mean over frames, then views, then objects (FVD pooled over all object-view videos).")
