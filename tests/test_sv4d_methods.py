"""The SV4D baselines as sampling methods of the pipeline: the stage runs Stability's loop with
the ported network, on the tiny backend here (the real checkpoints on a GPU machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from d2.config import ParamsError, load_params
from d2.stages.priors import MissingWeightsError, load_priors
from d2.stages.priors.sv4d import build_sv4d_network
from d2.stages.sampling import run_sampling, sv4d_loop_config
from d2.stages.sv4d_sampling import components_from_prior, sample_sv4d_matrix

TINY = ["priors.backend=tiny", "priors.tiny.resolution=8", "priors.tiny.block_out_channels=[32]",
        "priors.tiny.vae_block_out_channels=[32,32]", "conditions.resolution=8", "sampling.resolution=8",
        "conditions.num_steps=1", "sampling.num_steps=2", "fit.resolution=16", "run.progress=false"]


def shape(v: int, f: int = 21) -> list[str]:
    return [f"conditions.num_views={v}", f"sampling.num_views={v}", f"conditions.num_frames={f}",
            f"sampling.num_frames={f}"]


@pytest.fixture(scope="module")
def conditions(tmp_path_factory) -> dict[int, Path]:
    """Conditions of one 21-frame video input at V = 9 and V = 5 (the SV4D layouts)."""
    from d2.stages.conditions import run_conditions
    from d2.utils.io import save_image

    root = tmp_path_factory.mktemp("sv4d")
    video = root / "video"
    g = torch.Generator().manual_seed(0)
    for i in range(21):
        img = torch.ones(3, 8, 8)
        img[:, 2:6, 2 + i % 3:5 + i % 3] = torch.rand(3, 1, 1, generator=g)
        save_image(video / f"{i}.png", img)
    out = {}
    for v in (9, 5):
        p = load_params(None, TINY + shape(v))
        out[v] = root / f"conditions{v}"
        run_conditions(video, out[v], p.conditions, load_priors(p.priors))
    return out


@pytest.mark.parametrize("method,views", [("sv4d", 9), ("sv4d2", 5), ("sv4d2_8views", 9)])
def test_the_stage_runs_stabilitys_loop_with_the_ported_network(conditions, tmp_path, method, views):
    from d2.stages.conditions import load_conditions

    p = load_params(None, TINY + shape(views) + [f"sampling.method={method}"])
    priors, net = load_priors(p.priors), build_sv4d_network(p.priors, method)
    out = run_sampling(conditions[views], tmp_path / "m", p.sampling, priors, sv4d=net)
    meta = json.loads((out / "matrix.json").read_text())
    assert (meta["method"], meta["V"], meta["F"]) == (method, views, 21)
    assert "rollback_steps" in meta["ignored_knobs"] and "seed" not in meta["ignored_knobs"]
    assert len(list(out.glob("view_*/frame_*.png"))) == views * 21
    # the stage's latents are the loop's, called directly with the script's layout for the method
    cond = load_conditions(conditions[views])
    loop = sv4d_loop_config(p.sampling)
    assert loop.loop == ("sv4d" if method == "sv4d" else "sv4d2") and loop.views_per_window == views - 1
    comps = components_from_prior(priors[1], net.network, net.vector_widths)
    with torch.no_grad():
        direct, _ = sample_sv4d_matrix(cond.video.float(), cond.orbit if method == "sv4d" else None,
                                       list(cond.azimuths_deg), cond.elevation_deg, comps, loop)
    stored = torch.load(out / "latents.pt")["latents"]
    torch.testing.assert_close(stored, direct.float(), rtol=0, atol=0)
    assert stored[:-1].std() > 0.05  # sampled rows, not a copy of the input


def test_sv4d_methods_refuse_what_they_cannot_run_before_any_work():
    with pytest.raises(ParamsError, match=r"conditions.num_views \(and sampling.num_views\) must be 9, got 8"):
        load_params(None, TINY + shape(8) + ["sampling.method=sv4d"])
    with pytest.raises(ParamsError, match="must be 5"):
        load_params(None, TINY + shape(9) + ["sampling.method=sv4d2"])
    with pytest.raises(ParamsError, match="no SV4D-like model"):
        load_params(None, shape(9) + ["sampling.method=sv4d", "priors.backend=mini", "conditions.resolution=16"])
    # the script's guider scales unless set
    p = load_params(None, TINY + shape(9) + ["sampling.method=sv4d2_8views", "sampling.sv4d_cfg_max=3.0"])
    assert (sv4d_loop_config(p.sampling).cfg_min, sv4d_loop_config(p.sampling).cfg_max) == (1.5, 3.0)


def test_missing_sv4d_weights_name_the_file_and_how_to_get_them(tmp_path):
    p = load_params(None, shape(9) + ["sampling.method=sv4d", "priors.backend=stability",
                                      f"priors.hf_cache_dir={tmp_path}"])
    with pytest.raises(MissingWeightsError, match=r"sv4d\.safetensors of stabilityai/sv4d(.|\n)*huggingface-cli download"):
        build_sv4d_network(p.priors, "sv4d")
    with pytest.raises(FileNotFoundError, match="priors.sv4d_path"):
        build_sv4d_network(p.priors.model_copy(update={"sv4d_path": str(tmp_path / "none.safetensors")}), "sv4d")
    garbage = tmp_path / "sv4d.safetensors"
    garbage.write_bytes(b"\x00" * 7 + b"not a checkpoint")
    with pytest.raises(ValueError, match=r"sv4d\.safetensors: not a readable sv4d checkpoint"):
        build_sv4d_network(p.priors.model_copy(update={"sv4d_path": str(garbage)}), "sv4d")
