"""The ``asset`` flow: one input (image, video, frames folder or orbit folder) to a 4D asset."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from d2.tasks import env as _env  # noqa: F401  (environment before prefect)

import torch
from prefect import flow
from pydantic import BaseModel


from d2.tasks.runtime import (RunContext, asset_task, finish_run, get_stage_set, make_tracker,
                              new_recorder, register_context, release_context, tracking_meta)
from d2.utils.io import write_json


@flow(name="asset", log_prints=False)
def asset_flow(input_path: str, out_dir: str, params: dict[str, Any], gt_dir: str | None = None,
               name: str | None = None, stage_set: str = "default") -> dict[str, Any]:
    """conditions -> sampling -> fit -> render_eval (-> metrics with ground truth) for one input."""
    p = get_stage_set(stage_set).params_model.model_validate(params)
    torch.set_num_threads(p.run.threads_per_task)
    src = Path(input_path)
    if not src.exists():
        raise FileNotFoundError(f"input not found: {src}")
    obj = name or src.stem
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "params.json", p.model_dump(mode="json"))
    t0 = time.perf_counter()
    recorder = new_recorder(run_dir, "asset", {"input": str(src), "gt": gt_dir})
    tracker = make_tracker(p, "asset", f"asset/{obj}")
    recorder.meta.update(tracking_meta(tracker))
    ctx = RunContext(params=p, run_dir=run_dir, recorder=recorder, specs=get_stage_set(stage_set).specs, tracker=tracker)
    register_context(ctx)
    ok = False
    try:
        results = asset_task(ctx.id, obj, str(src), gt_dir)
        ok = True
    finally:
        finish_run(recorder, tracker, ok, t0)
        release_context(ctx.id)
    return {"run_dir": str(run_dir), "manifest": str(run_dir / "manifest.json"), "object": obj,
            "outputs": {s: str(r.out_dir) for s, r in results.items()},
            "mlflow_run_id": tracker.run_id if tracker else None}


def run_asset(input_path: str | Path, out_dir: str | Path, params: BaseModel, gt_dir: str | Path | None = None,
              name: str | None = None, stage_set: str = "default") -> dict[str, Any]:
    """Run the asset flow (validated ``params``)."""
    return asset_flow(str(input_path), str(out_dir), params.model_dump(mode="json"),
                      None if gt_dir is None else str(gt_dir), name, stage_set)
