"""The evaluation protocol as data (recorded in every results file).

Consistent4D's video-to-4D protocol: the input video is seen from azimuth 0; a method's 4D
output is rendered at azimuths -75, 15, 105, 195 (elevation 0) for every frame and compared
with the ground-truth renders ``gt/<object>/eval_{0..3}/<i>.png`` (32 frames, ground-truth frame i
is the time of input frame i).

Which frames are scored. An asset is made of F input frames ``s_0 < ... < s_{F-1}`` (the paper's
F = 25 of Consistent4D's 32: frames 0..24), its time t in [0, 1] running from ``s_0`` to
``s_{F-1}``. It is rendered at the time of every ground-truth frame it covers
(:func:`frames_to_score`: frame i at t = (i - s_0) / (s_{F-1} - s_0)) and render i is scored against
ground-truth frame i, over the rendered frames, as Consistent4D's
``compute_image_level_metrics.py`` scores a prediction folder (it pairs the k-th prediction with the
k-th ground-truth frame in sorted order, over the predictions: the same pairs when the frames start
at 0). ``num_frames`` asks for frames 0..num_frames-1 instead; a count the asset does not cover is
refused before any compute. The tables and ``metrics.json`` say which frames were scored.
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
    elevation_deg: float = Field(0.0, gt=-90, lt=90)  # elevation of every evaluation camera
    include_front_view: bool = False  # also score the front view (prediction `front/` vs the input frames)
    num_frames: int | None = Field(None, ge=1)  # score ground-truth frames 0..num_frames-1 (None: every frame the asset covers; for `d2 evaluate`, every predicted frame, as the script)
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
        """Consistent4D's protocol: 4 novel views, each predicted frame against the ground-truth frame of
        its number, no front view, the script's metrics at 512 px."""
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
        """Consistent4D's views plus the front view, ground-truth frames 0-24 (the 25 frames a
        Diffusion² asset covers). The paper reports CLIP similarity on Consistent4D's video-to-4D set
        without saying which frames or views it scored: this is one reading of it, not its stated
        protocol."""
        base = dict(name="front-and-25-frames", num_frames=25, include_front_view=True)
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
        frames = ("the ground-truth frames the asset covers, each rendered at its frame's time" if self.num_frames is None
                  else f"ground-truth frames 0-{self.num_frames - 1}, each rendered at its frame's time")
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


class FramePairingError(ValueError):
    """The frames a protocol scores cannot be paired with the frames an asset covers."""


def span_label(frames: "list[int]") -> str:
    """``0-24`` for consecutive frames, else the list (``0, 2, 4``)."""
    fs = sorted(frames)
    if fs and fs == list(range(fs[0], fs[-1] + 1)):
        return f"{fs[0]}-{fs[-1]}" if len(fs) > 1 else str(fs[0])
    return ", ".join(map(str, fs))


def frames_to_score(source_frames: "list[int]", num_frames: int | None) -> dict[int, float]:
    """Ground-truth frame index -> the asset time it is rendered at.

    Args:
        source_frames: the input frames the asset was made of, increasing (a video input:
            ``frame_start + j * frame_stride`` for j < F; an image or an orbit: 0..F-1, the frames
            of the generated reference video).
        num_frames: the protocol's ``num_frames`` (None: every frame the asset covers).

    The asset's time runs over ``source_frames[0]..source_frames[-1]``; every ground-truth frame
    in that span is covered (with a stride, the frames between two source frames too), at
    t = (i - s_0) / (s_{F-1} - s_0). Raises :class:`FramePairingError` naming both frame counts
    when ``num_frames`` asks for a frame the asset does not cover.
    """
    src = [int(i) for i in source_frames]
    if not src or any(b <= a for a, b in zip(src, src[1:])) or src[0] < 0:
        raise FramePairingError(f"source frames must be increasing and non-negative, got {src}")
    first, last = src[0], src[-1]
    covered = list(range(first, last + 1))
    if num_frames is None:
        want = covered
    else:
        want = list(range(num_frames))
        if want[0] < first or want[-1] > last:
            raise FramePairingError(
                f"protocol.num_frames = {num_frames} scores ground-truth frames 0-{num_frames - 1}, but the asset "
                f"covers {len(covered)} frame(s) ({span_label(covered)}: {len(src)} input frames from frame {first}); "
                f"set protocol.num_frames to null to score the {len(covered)} frames the asset covers, or make the "
                f"asset cover them (conditions.num_frames / frame_start / frame_stride)")
    span = last - first
    return {i: (0.0 if span == 0 else (i - first) / span) for i in want}
