"""The ``sweep`` flow: a grid of overrides, one benchmark per point.

Every point runs the same stage graph; the content-addressed cache makes points share
whatever stages a point does not change (a grid over ``sampling.*`` computes the
conditions of each object once). Objects of all points run in parallel up to
``run.max_parallel``; two tasks that need the same stage result compute it once.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import torch
from prefect import flow
from pydantic import BaseModel

from d2.config import ParamsError, parse_override, with_overrides
from d2.flows.benchmark import list_objects, object_jobs, raise_failures, summarize, tables_graph
from d2.flows.runners import task_runner
from d2.flows.engine import Job, closing, drive, finish, make_tracker, new_run, open_run_folder, prefect_api_check
from d2.reports.html import track_report, write_run_report
from d2.tasks.stages import STAGES, StageSet
from d2.tasks.tracking import flat_numbers
from d2.utils.io import write_json, write_text
from d2.validation import duplicate_axis_message


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``['sampling.s0=0.3,0.5', 'fit.iters=10,20']`` -> ``{'sampling.s0': [0.3, 0.5], ...}``.

    A knob named twice is refused: the rows would be labelled with one value and run with the other.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ParamsError(f"grid axis '{item}' must look like key=v1,v2,...")
        key, raw = item.split("=", 1)
        key = key.strip()
        values = [parse_override(f"{key}={v}")[1] for v in raw.split(",") if v.strip() != ""]
        if not values:
            raise ParamsError(f"grid axis '{item}' has no values")
        if key in grid:
            raise ParamsError(duplicate_axis_message(key, key, key))
        grid[key] = values
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
               stages: Any = None) -> dict[str, Any]:
    """grid -> one benchmark per point (sharing cached stages) -> the sweep table."""
    stages: StageSet = stages or STAGES
    base = stages.params_model.model_validate(params)
    torch.set_num_threads(base.run.threads_per_task)
    data = Path(data_dir)
    points = expand_grid(base, grid)
    objects = {pid: list_objects(data, p.run.objects) for pid, _, p in points}
    if stages.check_dataset is not None:
        for pid, _, p in points:
            stages.check_dataset(data, p, objects[pid])
    rows: list[dict[str, Any]] = []
    with open_run_folder(Path(out_dir)) as run_dir:
        tracker = make_tracker(base, "sweep", f"sweep/{run_dir.name}", {"grid": str(grid)})
        sweep = new_run(run_dir, "sweep", base, stages, {"grid": grid, "points": {pid: ov for pid, ov, _ in points}},
                        tracker)
        runs: dict[str, Any] = {}
        jobs: dict[str, list[Job]] = {}
        with closing(sweep, children=runs):
            for pid, overrides, p in points:
                point_tracker = make_tracker(p, "point", f"{run_dir.name}/{pid}", parent=tracker,
                                             tags={"d2.point": pid}) if tracker else None
                runs[pid] = new_run(run_dir / "points" / pid, "benchmark", p, stages,
                                    {"data": str(data), "objects_list": objects[pid], "overrides": overrides},
                                    point_tracker, label=pid, parent=sweep.recorder)
                jobs[pid] = object_jobs(runs[pid], data, objects[pid])
            # every point's objects at once: run.max_parallel stage tasks in flight over the whole grid
            drive([j for pid in jobs for j in jobs[pid]], base.run.max_parallel, prefect_api_check())
            tables = {pid: Job(runs[pid], "_benchmark", tables_graph(runs[pid], data, jobs[pid]))
                      for pid in jobs if not any(j.error for j in jobs[pid])}
            drive(list(tables.values()), base.run.max_parallel, prefect_api_check())
            failed = []
            for pid, overrides, _ in points:
                try:
                    raise_failures(jobs[pid] + ([tables[pid]] if pid in tables else []))
                    res = summarize(runs[pid], jobs[pid], tables[pid], str(data_dir))
                    rows.append({"point": pid, **dict(o.split("=", 1) for o in overrides),
                                 **flat_numbers(res["summary"])})
                    finish(runs[pid], "completed")
                except Exception as e:  # noqa: BLE001  (the sweep fails below, after every point ended)
                    failed.append(f"{pid}: {e}")
                    finish(runs[pid], "failed", str(e))
            if failed:
                raise RuntimeError("sweep points failed:\n" + "\n".join(failed))
            write_json(run_dir / "sweep.json", {"grid": grid, "rows": rows})
            write_text(run_dir / "sweep.md", _markdown(rows))
            ablation = _ablation(run_dir, {pid: ov for pid, ov, _ in points})
            if tracker is not None:
                files = [(run_dir / "sweep.md", "results"), (run_dir / "sweep.json", "results")]
                files += [(p, "results") for p in sorted((run_dir / "results").glob("*")) if p.is_file()]
                tracker.log_artifacts(tracker.run_id, files)
        report = write_run_report(sweep.run_dir)
        track_report(tracker, report)
    return {"run_dir": str(sweep.run_dir), "manifest": str(sweep.run_dir / "manifest.json"), "rows": rows,
            "report": report,
            "table": ablation or _markdown(rows), "mlflow_run_id": tracker.run_id if tracker else None,
            "flow_wall_seconds": sweep.recorder.meta["flow_wall_seconds"]}


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
              stages: StageSet | None = None) -> dict[str, Any]:
    """Run the sweep flow (grid points validated first) with ``run.max_parallel`` tasks at a time."""
    expand_grid(params, grid)  # validate every point before any compute
    f = sweep_flow.with_options(task_runner=task_runner(params))
    return f(str(data_dir), str(out_dir), params.model_dump(mode="json"), grid, stages)
