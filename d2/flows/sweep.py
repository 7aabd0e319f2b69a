"""The ``sweep`` flow: a grid of overrides, one benchmark per point.

Every point runs the same stage graph; the content-addressed cache makes points share
whatever stages a point does not change (a grid over ``sampling.*`` computes the
conditions of each object once). Objects of all points run in parallel up to
``run.max_parallel``; two tasks that need the same stage result compute it once.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from pathlib import Path
from typing import Any

from d2.tasks import env as _env  # noqa: F401  (environment before prefect)

import torch
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from d2.config import ParamsError, flatten_params, parse_override, with_overrides
from d2.flows.benchmark import finish_benchmark, open_benchmark, submit_objects
from d2.tasks.runtime import finish_run, get_stage_set, make_tracker, new_recorder, release_context, tracking_meta
from d2.tasks.tracking import flat_numbers
from d2.utils.io import write_json, write_text


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``['sampling.s0=0.3,0.5', 'fit.iters=10,20']`` -> ``{'sampling.s0': [0.3, 0.5], ...}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ParamsError(f"grid axis '{item}' must look like key=v1,v2,...")
        key, raw = item.split("=", 1)
        values = [parse_override(f"{key}={v}")[1] for v in raw.split(",") if v.strip() != ""]
        if not values:
            raise ParamsError(f"grid axis '{item}' has no values")
        if key in grid:
            raise ParamsError(f"grid axis '{key}' given twice")
        grid[key.strip()] = values
    return grid


def expand_grid(params: BaseModel, grid: dict[str, list[Any]]) -> list[tuple[str, list[str], BaseModel]]:
    """Every grid point as (id, overrides, validated params), validated before any compute."""
    keys = list(grid)
    points = []
    for i, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        overrides = [f"{k}={_yaml_value(v)}" for k, v in zip(keys, combo)]
        slug = "_".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, combo))
        pid = f"p{i:02d}_" + re.sub(r"[^A-Za-z0-9_.=-]", "-", slug)[:80]
        points.append((pid, overrides, with_overrides(params, overrides)))
    return points


def _yaml_value(v: Any) -> str:
    import json

    return json.dumps(v) if not isinstance(v, str) else v


@flow(name="sweep", log_prints=False)
def sweep_flow(data_dir: str, out_dir: str, params: dict[str, Any], grid: dict[str, list[Any]],
               stage_set: str = "default") -> dict[str, Any]:
    """grid -> one benchmark per point (sharing cached stages) -> the sweep table."""
    base = get_stage_set(stage_set).params_model.model_validate(params)
    torch.set_num_threads(base.run.threads_per_task)
    t0 = time.perf_counter()
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    points = expand_grid(base, grid)
    recorder = new_recorder(run_dir, "sweep", {"grid": grid, "points": {pid: ov for pid, ov, _ in points}})
    tracker = make_tracker(base, "sweep", f"sweep/{run_dir.name}", {"grid": str(grid)})
    recorder.meta.update(tracking_meta(tracker))
    write_json(run_dir / "params.json", base.model_dump(mode="json"))
    ok = False
    contexts = []
    slots = threading.BoundedSemaphore(base.run.max_parallel)  # shared by every point
    rows: list[dict[str, Any]] = []
    try:
        opened = []
        for pid, overrides, p in points:
            point_tracker = None
            if tracker is not None:
                point_tracker = tracker.nested(f"{run_dir.name}/{pid}", flatten_params(p),
                                               {"d2.kind": "point", "d2.point": pid})
            ctx, objects = open_benchmark(p, Path(data_dir), run_dir / "points" / pid, stage_set, "benchmark",
                                          label=pid, tracker=point_tracker, forward_to=recorder,
                                          meta={"overrides": overrides, **tracking_meta(point_tracker)},
                                          slots=slots)
            contexts.append(ctx)
            opened.append((pid, overrides, ctx, objects, submit_objects(ctx, Path(data_dir), objects)))
        failures = []
        for pid, overrides, ctx, objects, futures in opened:
            point_ok = False
            try:
                res = finish_benchmark(ctx, Path(data_dir), objects, futures)
                rows.append({"point": pid, **dict(o.split("=", 1) for o in overrides), **flat_numbers(res["summary"])})
                point_ok = True
            except Exception as e:  # noqa: BLE001  (the sweep fails below, after every point ended)
                failures.append(f"{pid}: {e}")
            finally:
                finish_run(ctx.recorder, ctx.tracker, point_ok)
        if failures:
            raise RuntimeError("sweep points failed:\n" + "\n".join(failures))
        write_json(run_dir / "sweep.json", {"grid": grid, "rows": rows})
        write_text(run_dir / "sweep.md", _markdown(rows))
        ablation = _ablation(run_dir, {pid: ov for pid, ov, _ in points})
        if tracker is not None:
            files = [(run_dir / "sweep.md", "results"), (run_dir / "sweep.json", "results")]
            files += [(p, "results") for p in sorted((run_dir / "results").glob("*")) if p.is_file()]
            tracker.log_artifacts(tracker.run_id, files)
        ok = True
    finally:
        finish_run(recorder, tracker, ok, t0)
        for ctx in contexts:
            release_context(ctx.id)
    return {"run_dir": str(run_dir), "manifest": str(run_dir / "manifest.json"), "rows": rows,
            "table": ablation or _markdown(rows), "mlflow_run_id": tracker.run_id if tracker else None,
            "flow_wall_seconds": recorder.meta["flow_wall_seconds"]}


def _ablation(run_dir: Path, points: dict[str, list[str]]) -> str:
    """The evaluation issue's ablation table (and figure grid) in ``run_dir/results``, when every
    point has results tables (the real stages); returns its markdown, else ''."""
    if not all((run_dir / "points" / pid / "results" / "results.json").is_file() for pid in points):
        return ""
    from d2.flows.report import _sweep_report

    _, md = _sweep_report(run_dir, run_dir / "results", {"points": points})
    return Path(md).read_text()


def _markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_sweep(data_dir: str | Path, out_dir: str | Path, params: BaseModel, grid: dict[str, list[Any]],
              stage_set: str = "default") -> dict[str, Any]:
    """Run the sweep flow (grid points validated first) with ``run.max_parallel`` tasks at a time."""
    expand_grid(params, grid)  # validate every point before any compute
    f = sweep_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=params.run.max_parallel))
    return f(str(data_dir), str(out_dir), params.model_dump(mode="json"), grid, stage_set)
