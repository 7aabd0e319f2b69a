"""One object, the paper's Figure 2 left to right, and the ``asset`` flow around it::

    input ─▶ conditions ─▶ sampling ─▶ fit ─▶ render_eval ─▶ metrics
             (reference    (the V x F    (4D        (renders at     (against ground
              orbit +       matrix: video Gaussians)  the protocol's  truth, when given)
              video)        x multi-view              azimuths)
                            score blend)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import BaseModel

from d2.flows.graph import Graph, Job, Stage, drive, raise_failures
from d2.flows.run import flow_params, run_scope
from d2.flows.runners import with_runner
from d2.execution.stages import StageSet
from d2.utils.paths import safe_name


def object_graph(params: BaseModel, input_path: str | Path, gt_dir: str | Path | None) -> Graph:
    """The stages of one object. Each ``yield`` runs a stage and gives back its output folder."""
    conditions = yield Stage("conditions", {"input": str(input_path)})
    matrix = yield Stage("sampling", {"conditions": conditions})
    gaussians = yield Stage("fit", {"matrix": matrix})
    renders = yield Stage("render_eval", {"gaussians": gaussians, "conditions": conditions})
    if gt_dir is not None:
        scored = {"pred": renders, "gt": str(gt_dir)}
        if getattr(getattr(params, "protocol", None), "include_front_view", False):
            scored["input"] = str(input_path)  # the input view is scored against the input frames
        yield Stage("metrics", scored)


@flow(name="asset", log_prints=False)
def asset_flow(input_path: str, out_dir: str, params: dict[str, Any], gt_dir: str | None = None,
               name: str | None = None, stages: Any = None) -> dict[str, Any]:
    """conditions -> sampling -> fit -> render_eval (-> metrics with ground truth) for one input."""
    p, stages = flow_params(params, stages)
    src = Path(input_path)
    if not src.exists():
        raise FileNotFoundError(f"input not found: {src}")
    obj = safe_name(name or src.stem, "--name")
    if stages.check_input is not None:
        stages.check_input(src, p, gt_dir)
    with run_scope(out_dir, "asset", p, stages, {"input": str(src), "gt": gt_dir}, f"asset/{obj}") as run:
        job = Job(run, obj, object_graph(p, src, gt_dir), input_path=str(src))
        drive([job], p.run.max_parallel)
        raise_failures([job])
    return run.result(object=obj, outputs={s: str(r.out_dir) for s, r in job.results.items()})


def run_asset(input_path: str | Path, out_dir: str | Path, params: BaseModel, gt_dir: str | Path | None = None,
              name: str | None = None, stages: StageSet | None = None) -> dict[str, Any]:
    """Run the asset flow on ``run.runner`` (validated ``params``)."""
    return with_runner(asset_flow, params)(str(input_path), str(out_dir), params.model_dump(mode="json"),
                                           None if gt_dir is None else str(gt_dir), name, stages)
