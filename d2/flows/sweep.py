"""The ``sweep`` flow: a grid of overrides, one benchmark per point.

Every point runs the same stage graph; the content-addressed cache makes points share
whatever stages a point does not change (a grid over ``sampling.*`` computes the
conditions of each object once). Objects of all points run in parallel up to
``run.max_parallel``; two tasks that need the same stage result compute it once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import BaseModel

from d2.flows.benchmark import checked_objects, object_jobs, summarize, tables_graph
from d2.flows.graph import Job, drive, raise_failures
from d2.flows.run import finish, flow_params, run_scope
from d2.flows.runners import with_runner
from d2.reports.run_report import sweep_report
from d2.execution.stages import StageSet
from d2.execution.tracking import flat_numbers
from d2.utils.io import write_json, write_text
from d2.validation import grid_points


@flow(name="sweep", log_prints=False)
def sweep_flow(data_dir: str, out_dir: str, params: dict[str, Any], grid: dict[str, list[Any]],
               stages: Any = None) -> dict[str, Any]:
    """grid -> one benchmark per point (sharing cached stages) -> the sweep table."""
    base, stages = flow_params(params, stages)
    data = Path(data_dir)
    points = grid_points(base, grid)
    objects = {pid: checked_objects(data, p, stages) for pid, _, p in points}
    overrides = {pid: ov for pid, ov, _ in points}
    with run_scope(out_dir, "sweep", base, stages, {"grid": grid, "points": overrides},
                   mlflow_params={"grid": str(grid)}) as sweep:
        runs = {pid: sweep.point(pid, p, {"data": str(data), "objects_list": objects[pid], "overrides": overrides[pid]})
                for pid, _, p in points}
        jobs = {pid: object_jobs(run, data, objects[pid]) for pid, run in runs.items()}
        # every point's objects at once: run.max_parallel stage tasks in flight over the whole grid
        drive([j for pid in jobs for j in jobs[pid]], base.run.max_parallel)
        tables = {pid: Job(runs[pid], "_benchmark", tables_graph(runs[pid], data, jobs[pid]))
                  for pid in jobs if not any(j.error for j in jobs[pid])}
        drive(list(tables.values()), base.run.max_parallel)
        rows, failed = [], []
        for pid, run in runs.items():
            try:
                raise_failures(jobs[pid] + ([tables[pid]] if pid in tables else []))
                summary = summarize(run, jobs[pid], tables[pid], str(data_dir))["summary"]
                rows.append({"point": pid, **dict(o.split("=", 1) for o in overrides[pid]), **flat_numbers(summary)})
                finish(run, "completed")
            except Exception as e:  # noqa: BLE001  (the sweep fails below, after every point ended)
                failed.append(f"{pid}: {e}")
                finish(run, "failed", str(e))
        if failed:
            raise RuntimeError("sweep points failed:\n" + "\n".join(failed))
        write_json(sweep.run_dir / "sweep.json", {"grid": grid, "rows": rows})
        write_text(sweep.run_dir / "sweep.md", markdown_table(rows))
        ablation = ablation_table(sweep.run_dir, overrides)
        if sweep.tracker is not None:
            files = [sweep.run_dir / "sweep.md", sweep.run_dir / "sweep.json",
                     *sorted(p for p in (sweep.run_dir / "results").glob("*") if p.is_file())]
            sweep.tracker.log_artifacts(sweep.tracker.run_id, [(f, "results") for f in files])
    return sweep.result(rows=rows, table=ablation or markdown_table(rows))


def ablation_table(run_dir: Path, points: dict[str, list[str]]) -> str:
    """The ablation table (and figure grid) in ``run_dir/results`` when every point has results
    tables (the real stages); returns its markdown, else ''."""
    if not all((run_dir / "points" / pid / "results" / "results.json").is_file() for pid in points):
        return ""
    _, md = sweep_report(run_dir, run_dir / "results", points)
    return Path(md).read_text()


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """``rows`` (dicts) as a markdown table, one column per key."""
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
    grid_points(params, grid)  # validate every point before any compute
    return with_runner(sweep_flow, params)(str(data_dir), str(out_dir), params.model_dump(mode="json"), grid, stages)
