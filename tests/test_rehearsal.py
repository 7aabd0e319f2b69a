"""Every preset rehearsed end to end at the benchmark's real shape.

``d2 benchmark --preset NAME --rehearse`` on a dataset laid out exactly as Consistent4D's released
test set (its 7 object names, 32-frame RGBA input videos, 4 x 32 ground-truth frames, 512 px): the
preset's views, frames, cameras, protocol and every other knob, with only the sizes of
``params/overlays/rehearsal.yaml`` shrunk. A preset whose asset cannot be scored against that
ground truth (the 25-frame asset scored against 32 frames) fails here, not after GPU hours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from d2.config import REHEARSAL_OVERLAY, available_presets, flatten_params, load_params, overlay_overrides, preset_path
from d2.world.benchmark import CONSISTENT4D_FRAMES, CONSISTENT4D_OBJECTS, generate_consistent4d_shape

BIN = Path(sys.executable).parent

# The knobs the rehearsal may change: sizes (pixels, widths, step and iteration counts and the fit's
# schedule with them), devices, and the two consequences of having no weights (the priors' backend,
# the fit's LPIPS requirement). Anything else in the overlay fails test_the_overlay_changes_only_sizes.
REHEARSAL_KNOBS = {
    "priors.backend", "priors.device", "priors.cudnn_benchmark", "conditions.chunk_size", "sampling.chunk_size", "priors.tiny.resolution", "priors.tiny.block_out_channels",
    "priors.tiny.vae_block_out_channels", "conditions.resolution", "conditions.num_steps", "sampling.resolution",
    "sampling.num_steps", "sampling.rollback_steps", "sampling.devices", "fit.resolution", "fit.iterations", "fit.num_gaussians",
    "fit.max_gaussians", "fit.sh_increase_every", "fit.lr_means_max_steps", "fit.densify_from", "fit.densify_until",
    "fit.densify_every", "fit.opacity_reset_every", "fit.lpips_required", "fit.device", "fit.turntable_frames",
    "render_eval.resolution", "render_eval.device", "metrics.device", "protocol.resolution",
}
# What a rehearsal must never change: the structure a mismatch could hide in.
KEPT = ("conditions.num_views", "conditions.num_frames", "conditions.frame_start", "conditions.frame_stride",
        "conditions.elevation_deg", "conditions.fov_deg", "conditions.radius", "sampling.num_views",
        "sampling.num_frames", "protocol.eval_azimuths_deg", "protocol.input_azimuth_deg", "protocol.elevation_deg",
        "protocol.num_frames", "protocol.include_front_view", "protocol.metric_definitions", "protocol.background",
        "metrics.metrics", "sampling.weight_schedule", "fit.exclude_views", "sampling.method")


def test_the_overlay_changes_only_sizes():
    keys = {o.split("=", 1)[0] for o in overlay_overrides()}
    assert keys <= REHEARSAL_KNOBS, sorted(keys - REHEARSAL_KNOBS)
    assert not [k for k in keys for kept in KEPT if k.startswith(kept)]
    assert yaml.safe_load(REHEARSAL_OVERLAY.read_text())  # a readable overlay, documented in its header
    for name in available_presets():  # every preset validates with it
        p = load_params(preset_path(name), overlay_overrides())
        base = flatten_params(load_params(preset_path(name)))
        changed = {k for k, v in flatten_params(p).items() if base.get(k) != v}
        assert changed <= REHEARSAL_KNOBS, (name, sorted(changed - REHEARSAL_KNOBS))


@pytest.fixture(scope="module")
def c4d_shape(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("c4d") / "data"
    generate_consistent4d_shape(root, progress=False)
    return root


def test_the_dataset_has_consistent4d_layout(c4d_shape: Path):
    from PIL import Image

    assert sorted(p.name for p in (c4d_shape / "input").iterdir()) == sorted(CONSISTENT4D_OBJECTS)
    for obj in CONSISTENT4D_OBJECTS:
        assert sorted(int(p.stem) for p in (c4d_shape / "input" / obj).iterdir()) == list(range(CONSISTENT4D_FRAMES))
        for k in range(4):
            frames = sorted(int(p.stem) for p in (c4d_shape / "gt" / obj / f"eval_{k}").iterdir())
            assert frames == list(range(CONSISTENT4D_FRAMES))
    img = Image.open(c4d_shape / "input" / "skull" / "0.png")
    assert img.mode == "RGBA" and img.size == (512, 512)
    alpha = img.getchannel("A")
    assert alpha.getextrema() == (0, 255)  # the object on transparency


@pytest.fixture(scope="module")
def rehearsals(tmp_path_factory, c4d_shape: Path) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every preset's rehearsal, started at once into one working folder and so one stage cache, as
    a user running them side by side would: stages the presets share (under the rehearsal's sizes
    `paper` is `fast`, and shares `authors`' conditions) are computed once under the key's lock and
    served to the others. Returns ``{preset: (run folder, finished process)}``."""
    project = tmp_path_factory.mktemp("rehearsals")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for preset in available_presets():
        cmd = [str(BIN / "d2"), "benchmark", "--preset", preset, "--rehearse", "--data", str(c4d_shape),
               "--out", str(project / preset), "--no-progress"]
        log = open(project / f"{preset}.log", "w")
        procs[preset] = (subprocess.Popen(cmd, cwd=project, stdout=log, stderr=subprocess.STDOUT, text=True,
                                          env=env, start_new_session=True), log)
    out = {}
    try:
        for preset, (proc, log) in procs.items():
            proc.wait(timeout=1500)
            log.close()
            text = (project / f"{preset}.log").read_text()
            out[preset] = (project / preset, subprocess.CompletedProcess(proc.args, proc.returncode, text, ""))
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("preset", available_presets())
def test_rehearsal_of_every_preset_at_the_benchmarks_shape(preset: str, rehearsals: dict):
    out, r = rehearsals[preset]
    assert r.returncode == 0, r.stdout[-6000:]
    assert "ImportError" not in r.stdout  # cold processes importing stages in parallel threads

    # the run used the preset's structure, with sizes only shrunk
    used = flatten_params(_params_of(out))
    preset_params = flatten_params(load_params(preset_path(preset)))
    for k, v in preset_params.items():
        if k not in REHEARSAL_KNOBS and not k.startswith(("run.progress", "prepare.progress")):
            assert used.get(k) == v, (k, used.get(k), v)

    # every object scored on the ground-truth frames its asset covers, each render at its frame's time
    p = load_params(preset_path(preset))
    covered = p.protocol.num_frames or p.conditions.num_frames  # a video read from frame 0 with stride 1
    results = json.loads((out / "results" / "results.json").read_text())
    assert results["frames"] == {"scored": f"0-{covered - 1}", "per_view": covered,
                                 "ground_truth": CONSISTENT4D_FRAMES}
    assert sorted({s["object"] for s in results["per_frame"]}) == sorted(CONSISTENT4D_OBJECTS)
    assert len(results["per_frame"]) == len(CONSISTENT4D_OBJECTS) * 4 * covered
    for obj in CONSISTENT4D_OBJECTS:
        rendered = sorted(int(f.stem) for f in (out / "pred" / obj / "eval_2").iterdir())
        assert rendered == list(range(covered))
    metrics = json.loads((out / "metrics.json").read_text())
    assert "psnr" in metrics and "ssim" in metrics and metrics["frames"]["per_view"] == covered
    table = (out / "results" / "results.md").read_text()
    assert f"Frames scored: 0-{covered - 1} ({covered} per view, of {CONSISTENT4D_FRAMES} ground-truth" in table


def _params_of(run_dir: Path) -> "object":
    from d2.config import Params

    return Params.model_validate(json.loads((run_dir / "params.json").read_text()))


def test_a_fit_below_its_ssim_window_is_refused_at_loading():
    """Found by the first rehearsal: an 8 px matrix reached the fit and failed there, after sampling."""
    from d2.config import ParamsError

    with pytest.raises(ParamsError, match=r"fit sees 8x8 px images .* smaller than its SSIM's 11 px window"):
        load_params(preset_path("paper"), overlay_overrides() + ["fit.resolution=null"])
    load_params(preset_path("paper"), overlay_overrides() + ["fit.resolution=null", "fit.lambda_ssim=0"])
