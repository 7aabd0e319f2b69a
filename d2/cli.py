"""The ``d2`` command: prepare, generate, benchmark, sweep, report, evaluate, demo, schedule, params.

Every command reads ``--params`` (default ``params.yaml``), applies ``--set key=value``
overrides and validates everything before any compute. Runs write ``DIR/manifest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

EXPECTED_STAGES_PER_OBJECT = 5  # conditions, sampling, fit, render_eval, metrics


# ---------------------------------------------------------------------------------------
# Progress display


STARTING = "starting Prefect (API server and flow run) ..."  # shown until the first stage starts


class ProgressDisplay:
    """A rich progress bar over stage executions, fed by the run's Recorder (thread-safe)."""

    def __init__(self, total: int, title: str, enabled: bool = True) -> None:
        self.enabled = enabled and total > 0
        self.total = total
        self.title = title
        self.running: dict[tuple[str, str], float] = {}
        self.steps: dict[tuple[str, str], dict] = {}  # (object, stage) -> its last progress report
        self.counts = {"computed": 0, "cached": 0}
        self._lock = threading.Lock()
        self._progress = None
        self._task = None

    def __enter__(self) -> "ProgressDisplay":
        from d2.tasks.manifest import LISTENERS

        LISTENERS.append(self)
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("[bold]{task.fields[title]}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.description}"),
                                      transient=False, refresh_per_second=4)
            self._progress.start()
            self._task = self._progress.add_task(STARTING, total=self.total, title=self.title)
        return self

    def __exit__(self, *exc: Any) -> None:
        from d2.tasks.manifest import LISTENERS

        if self in LISTENERS:
            LISTENERS.remove(self)
        if self._progress is not None:
            self._progress.update(self._task, description=self._summary())
            self._progress.stop()

    def _summary(self) -> str:
        by_stage: dict[str, list[str]] = {}
        for o, s in list(self.running):
            by_stage.setdefault(s, []).append(o.lstrip("_") or s)
        now = time.perf_counter()
        running = "; ".join(
            f"{s} {', '.join(objs[:3])}{f' +{len(objs) - 3}' if len(objs) > 3 else ''}"
            for s, objs in by_stage.items())
        oldest = min(self.running.values(), default=None)
        since = f" ({now - oldest:.0f} s)" if oldest is not None else ""
        c = self.counts
        steps = "; ".join(self._step_text(o, s, info) for (o, s), info in list(self.steps.items())[:2])
        return (f"computed {c['computed']} · cached {c['cached']}" + (f" · running {running}{since}" if running else "")
                + (f" · {steps}" if steps else ""))

    @staticmethod
    def _step_text(obj: str, stage: str, info: dict) -> str:
        """``fit ball 120/500 ETA 40 s loss 0.0512 psnr 24.10`` from a stage's progress report."""
        step, steps = int(info.get("step", 0)), int(info.get("steps", 0))
        elapsed = float(info.get("time", 0.0)) - float(info.get("started", 0.0))
        eta = f" ETA {elapsed / step * (steps - step):.0f} s" if step > 0 and steps > step else ""
        nums = " ".join(f"{k} {info[k]:.4g}" for k in ("loss", "psnr", "sigma") if isinstance(info.get(k), (int, float)))
        return f"{stage} {obj.lstrip('_') or stage} {step}/{steps}{eta}" + (f" {nums}" if nums else "")

    def stage_progress(self, obj: str, stage: str, info: dict) -> None:
        with self._lock:
            if (obj, stage) in self.running:
                self.steps[(obj, stage)] = info
        if self._progress is not None:
            self._progress.update(self._task, description=self._summary())

    def stage_started(self, obj: str, stage: str) -> None:
        with self._lock:
            self.running[(obj, stage)] = time.perf_counter()
        if self._progress is not None:
            self._progress.update(self._task, description=self._summary())

    def stage_finished(self, result: Any) -> None:
        with self._lock:
            self.running.pop((result.object, result.stage), None)
            self.steps.pop((result.object, result.stage), None)
            self.counts[result.status] += 1
        if self._progress is not None:
            self._progress.update(self._task, advance=1, description=self._summary())


# ---------------------------------------------------------------------------------------
# Helpers


def _params(args: argparse.Namespace) -> Any:
    from d2.config import load_params, overlay_overrides, preset_path

    overrides = (overlay_overrides() if getattr(args, "rehearse", False) else []) + list(args.set or [])
    if getattr(args, "no_progress", False):
        overrides.append("run.progress=false")
    path = preset_path(args.preset) if getattr(args, "preset", None) else args.params
    return load_params(path, overrides)


def _print(text: str = "") -> None:
    print(text, flush=True)


def _input_reading(conditions_dir: str | None) -> str:
    """How the conditions stage read the input (its conditions.json), '' when unknown."""
    try:
        meta = json.loads((Path(conditions_dir) / "conditions.json").read_text())
    except (OSError, TypeError, ValueError):
        return ""
    return str((meta.get("input_reading") or {}).get("summary", ""))


def _report_hint(result: dict[str, Any]) -> str:
    page = result.get("report")
    return f"report: {page} (open it in a browser; no server needed)" if page else "report: not written (see above)"


def _mlflow_hint(result: dict[str, Any]) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not result.get("mlflow_run_id"):
        return "MLflow: off (run.mlflow=false)"
    ui = f".venv/bin/mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"mlflow ui ({uri})"
    return f"MLflow: run {result['mlflow_run_id']} in {uri}\n  browse: {ui}"


def _check_out(out: str | Path) -> None:
    """Take ``out``'s run lock before Prefect starts (the flow adopts it); refused at once when
    another live run holds it."""
    from d2.preflight import hold_run_folder

    hold_run_folder(out)


def start_prefect() -> None:
    """Start the ephemeral Prefect API server now (unless ``PREFECT_API_URL`` names one): in its own
    session (a terminal's Ctrl-C reaches only this process), with a watchdog that stops it if this
    process dies without stopping it (``kill -9``); see :mod:`d2.lifecycle`."""
    from d2.lifecycle import start_prefect as start

    start()


def stop_prefect() -> None:
    """Stop the ephemeral Prefect API server this process started (no-op otherwise)."""
    from d2.lifecycle import stop_prefect as stop

    stop()


def _dataset_objects(data: Path, params: Any) -> list[str]:
    from d2.flows.benchmark import list_objects

    return list_objects(data, params.run.objects)


def _print_benchmark(result: dict[str, Any]) -> None:
    _print()
    _print(result.get("table") or json.dumps(result.get("summary", {}), indent=2))
    _print(f"run folder: {result['run_dir']}   (manifest: {result['manifest']})")
    _print(f"tables: {result['results_dir']}")
    videos = result.get("videos", {})
    if videos:
        _print("turntable videos:")
        for obj, path in videos.items():
            _print(f"  {obj}: {path}")
    _print(_report_hint(result))
    _print(_mlflow_hint(result))


def _counts(manifest: str | Path) -> str:
    m = json.loads(Path(manifest).read_text())
    t = m["totals"]
    return f"stages computed {t['computed']}, cached {t['cached']}; wall {m.get('flow_wall_seconds', m['wall_seconds']):.1f} s"


# ---------------------------------------------------------------------------------------
# Commands


def cmd_params(args: argparse.Namespace) -> int:
    """Print the validated params (YAML with comments)."""
    from d2.config import render_params_yaml

    sys.stdout.write(render_params_yaml(_params(args)))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Write the procedural mini-benchmark."""
    p = _params(args)
    out = Path(args.out or p.run.data_dir)
    if args.like == "consistent4d":
        from d2.world.benchmark import generate_consistent4d_shape

        generate_consistent4d_shape(out, progress=p.run.progress)
        _print(f"a dataset shaped as Consistent4D's test set (7 objects, 32 RGBA frames, 4 views, 512 px) written "
               f"to {out}")
        return 0
    prepare_dataset(p, out)
    _print(f"mini-benchmark written to {out}")
    return 0


def prepare_dataset(p: Any, out: Path) -> Path:
    """Generate the procedural benchmark into ``out`` with ``p.prepare``."""
    import torch

    from d2.world.benchmark import generate_benchmark

    torch.set_num_threads(max(1, p.run.threads_per_task * p.run.max_parallel))
    cfg = p.prepare.model_copy(update={"progress": p.prepare.progress and p.run.progress})
    return generate_benchmark(out, cfg)


def cmd_generate(args: argparse.Namespace) -> int:
    """One input to a 4D asset."""
    p = _params(args)
    src = Path(args.input)
    if not src.exists():
        raise FileNotFoundError(f"input not found: {src}")
    from d2.utils.paths import safe_name

    safe_name(args.name or src.stem, "--name")
    _check_out(args.out)
    start_prefect()
    from d2.flows import run_asset

    total = EXPECTED_STAGES_PER_OBJECT - (0 if args.gt else 1)
    with ProgressDisplay(total, f"generate {src.name}", p.run.progress):
        result = run_asset(src, args.out, p, gt_dir=args.gt, name=args.name)
    _print(f"asset written to {result['run_dir']} ({_counts(result['manifest'])})")
    reading = _input_reading(result["outputs"].get("conditions"))
    if reading:
        _print(f"input read as: {reading}")
    for stage, path in result["outputs"].items():
        _print(f"  {stage}: {path}")
    _print(f"turntable video: {Path(result['outputs']['fit']) / 'turntable.mp4'}")
    _print(_report_hint(result))
    _print(_mlflow_hint(result))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    """A dataset: one asset per object, then the tables."""
    p = _params(args)
    data = Path(args.data or p.run.data_dir)
    objects = _dataset_objects(data, p)
    _check_out(args.out)
    start_prefect()
    from d2.flows import run_benchmark

    with ProgressDisplay(len(objects) * EXPECTED_STAGES_PER_OBJECT + 1, f"benchmark {data.name}", p.run.progress):
        result = run_benchmark(data, args.out, p)
    _print_benchmark(result)
    _print(_counts(result["manifest"]))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A grid of overrides: one benchmark per point, sharing unchanged stages."""
    p = _params(args)
    from d2.flows.sweep import expand_grid, parse_grid, run_sweep

    grid = parse_grid(args.grid)
    points = expand_grid(p, grid)
    data = Path(args.data or p.run.data_dir)
    objects = _dataset_objects(data, p)
    _check_out(args.out)
    start_prefect()
    total = len(points) * (len(objects) * EXPECTED_STAGES_PER_OBJECT + 1)
    with ProgressDisplay(total, f"sweep {len(points)} points", p.run.progress):
        result = run_sweep(data, args.out, p, grid)
    _print()
    _print(result["table"])
    _print(f"sweep folder: {result['run_dir']} ({_counts(result['manifest'])})")
    _print(_report_hint(result))
    _print(_mlflow_hint(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild the tables of a benchmark or sweep folder (no compute)."""
    from d2.flows.report import build_report

    out = build_report(Path(args.run), Path(args.out) if args.out else None,
                       Path(args.metrics) if args.metrics else None)
    _print(Path(out["table_path"]).read_text())
    from d2.reports.html import build_html_report

    page = build_html_report(Path(args.run), Path(out["out_dir"]))
    _print(f"report written to {out['out_dir']} (open {page} in a browser)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score predictions against ground truth (Consistent4D layout)."""
    p = _params(args)
    from d2.eval.benchmark import evaluate_command

    evaluate_command(args.pred, args.gt, out=args.out, require_metrics=args.require_metrics or (),
                     protocol=p.protocol, metrics_cfg=p.metrics, progress=p.run.progress, print_fn=_print)
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    """Serve the benchmark flow on a cron schedule (Prefect deployment)."""
    p = _params(args)
    from d2.flows.schedule import build_schedule, serve_schedule

    dep = build_schedule(p, Path(args.data or p.run.data_dir), Path(args.out), args.cron, args.name, args.timezone)
    api = os.environ.get("PREFECT_API_URL")
    _print(f"serving deployment '{dep.name}' of flow 'benchmark' on '{args.cron}' into {args.out}"
           + (f" (Prefect API {api})" if api else " (no PREFECT_API_URL: an ephemeral server, no UI)"))
    serve_schedule(dep)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Prepare the mini-benchmark if missing, run the benchmark on CPU, print the results."""
    p = _params(args)
    data = Path(args.data or p.run.data_dir)
    t0 = time.perf_counter()
    if not (data / "meta.json").exists():
        _print(f"preparing the procedural mini-benchmark in {data} ...")
        prepare_dataset(p, data)
    objects = _dataset_objects(data, p)
    _print(f"benchmark: {len(objects)} objects ({', '.join(objects)}), backends "
           f"video={p.priors.video_backend or p.priors.backend} multiview={p.priors.multiview_backend or p.priors.backend}, "
           f"V={p.sampling.num_views} F={p.sampling.num_frames} {p.sampling.resolution}px, "
           f"{p.sampling.num_steps} steps, fit {p.fit.iterations} it, max_parallel={p.run.max_parallel}")
    _check_out(args.out)
    start_prefect()
    from d2.flows import run_benchmark

    with ProgressDisplay(len(objects) * EXPECTED_STAGES_PER_OBJECT + 1, "demo", p.run.progress):
        result = run_benchmark(data, args.out, p)
    _print_benchmark(result)
    _print(f"{_counts(result['manifest'])}; demo total {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------
# Parser


def _common(sp: argparse.ArgumentParser) -> None:
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    which.add_argument("--preset", metavar="NAME",
                       help="a named overlay of the defaults in params/: authors, paper, demo, fast (docs/presets.md)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                    help="override a param (dotted key, YAML value), e.g. --set sampling.num_steps=10; repeatable")
    sp.add_argument("--rehearse", action="store_true",
                    help="apply params/overlays/rehearsal.yaml after the params: the same run at tiny sizes on the CPU "
                         "(tiny random priors, 8 px, 2 steps, 50 fit iterations), every count, camera and protocol "
                         "knob kept; with `d2 prepare --like consistent4d` it rehearses a preset before GPU hours")
    sp.add_argument("--no-progress", action="store_true", help="no progress display (same as --set run.progress=false)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``d2``."""
    ap = argparse.ArgumentParser(prog="d2", description="Diffusion²: 4D assets by composing video and multi-view "
                                 "diffusion scores, as cached Prefect flows tracked in MLflow and DVC.")
    sub = ap.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("prepare", help="write the procedural mini-benchmark (Consistent4D layout)")
    sp.add_argument("--out", help="dataset folder (default: run.data_dir)")
    sp.add_argument("--like", choices=["mini", "consistent4d"], default="mini",
                    help="mini: the procedural mini-benchmark (section prepare); consistent4d: the file layout of "
                         "Consistent4D's released test set (its 7 object names, 32-frame RGBA inputs, 4 x 32 "
                         "ground-truth frames, 512 px) with procedural content, for `--rehearse`")
    _common(sp)
    sp.set_defaults(fn=cmd_prepare)

    sp = sub.add_parser("generate", help="one input (image, video, frames folder, orbit folder) to a 4D asset")
    sp.add_argument("--input", required=True, help="image file, video file, folder of frames, or orbit folder")
    sp.add_argument("--out", required=True, help="run folder")
    sp.add_argument("--gt", help="ground-truth folder (eval_{k}/{i}.png) to score the asset against")
    sp.add_argument("--name", help="object name (default: the input's name)")
    _common(sp)
    sp.set_defaults(fn=cmd_generate)

    sp = sub.add_parser("benchmark", help="a dataset: one asset per object (in parallel), then the tables")
    sp.add_argument("--data", help="dataset folder (default: run.data_dir)")
    sp.add_argument("--out", required=True, help="run folder")
    _common(sp)
    sp.set_defaults(fn=cmd_benchmark)

    sp = sub.add_parser("sweep", help="a grid of overrides: one benchmark per point, sharing unchanged stages")
    sp.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                    help="one grid axis, e.g. --grid sampling.s0=0.3,0.5; repeatable (the grid is the product)")
    sp.add_argument("--data", help="dataset folder (default: run.data_dir)")
    sp.add_argument("--out", required=True, help="sweep folder")
    _common(sp)
    sp.set_defaults(fn=cmd_sweep)

    sp = sub.add_parser("report", help="rebuild the tables of a benchmark or sweep folder (no compute)")
    sp.add_argument("--run", required=True, help="benchmark or sweep folder (with manifest.json)")
    sp.add_argument("--out", help="report folder (default: RUN/report)")
    sp.add_argument("--metrics", help="write the headline numbers here (default: OUT/metrics.json)")
    _common(sp)
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser("evaluate", help="score predictions against ground truth (Consistent4D layout)")
    sp.add_argument("--pred", required=True, help="predictions: <pred>/<object>/eval_{k}/{i}.png")
    sp.add_argument("--gt", required=True, help="ground truth: <gt>/<object>/eval_{k}/{i}.png")
    sp.add_argument("--out", help="results folder (default: PRED/eval)")
    sp.add_argument("--require-metrics", help="comma list of metrics that must be available, e.g. clip,lpips")
    _common(sp)
    sp.set_defaults(fn=cmd_evaluate)

    sp = sub.add_parser("demo", help="the benchmark on the procedural mini-benchmark with the CPU backends")
    sp.add_argument("--data", help="dataset folder (default: run.data_dir; prepared when missing)")
    sp.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    _common(sp)
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("schedule", help="serve the benchmark flow on a cron schedule (e.g. nightly)")
    sp.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *"')
    sp.add_argument("--data", help="dataset folder (default: run.data_dir)")
    sp.add_argument("--out", required=True, help="run folder of every scheduled run")
    sp.add_argument("--name", default="nightly-benchmark", help="deployment name")
    sp.add_argument("--timezone", help="IANA timezone of the cron expression (default UTC)")
    _common(sp)
    sp.set_defaults(fn=cmd_schedule)

    sp = sub.add_parser("params", help="print the validated params as commented YAML")
    _common(sp)
    sp.set_defaults(fn=cmd_params)
    return ap


def quiet_library_bars(no_progress: bool) -> None:
    """The run shows one progress display: the Hugging Face libraries' own bars ("Loading weights")
    are off, and with ``--no-progress`` every tqdm bar is (``TQDM_DISABLE``). Set before the
    libraries are imported (they read it then)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if no_progress:
        os.environ["TQDM_DISABLE"] = "1"


def _preflight(args: argparse.Namespace) -> None:
    """Params, inputs, datasets and the machine checked before any command starts (d2.preflight);
    warnings on stderr."""
    from d2.preflight import preflight

    if args.command != "report":
        for warning in preflight(args.command, vars(args), _params(args)):
            print(f"d2 {args.command}: warning: {warning}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``d2`` console script."""
    args = build_parser().parse_args(argv)
    from d2.env import setup_env

    setup_env()  # before Prefect or MLflow is imported
    quiet_library_bars(getattr(args, "no_progress", False))
    from d2.config import ParamsError
    from d2.lifecycle import install_handlers, interrupted, restore_handlers, server_problem
    from d2.validation import InputError

    out = getattr(args, "out", None)
    where = f"; what ran is in {Path(out) / 'manifest.json'}" if out else ""
    if threading.current_thread() is threading.main_thread():
        install_handlers(f"d2 {args.command}: interrupted again: stopped at once{where}")
    try:
        _preflight(args)
        rc = int(args.fn(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, where it is handled, not at exit
        return rc
    except (ParamsError, InputError) as e:
        if os.environ.get("D2_DEBUG"):
            raise
        print(f"d2 {args.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`d2 params | head`): what it read is all it wanted
        _quiet_stdout()
        return 0
    except Exception as e:  # noqa: BLE001  (one clear line; D2_DEBUG=1 shows the traceback)
        if interrupted():  # an error the interrupt caused (a library cut short)
            _exit_interrupted(args, where)
        if os.environ.get("D2_DEBUG"):
            raise
        print(f"d2 {args.command}: {server_problem() or f'{type(e).__name__}: {e}'}", file=sys.stderr)
        if out and (Path(out) / "manifest.json").is_file():
            print(f"(what ran is in {Path(out) / 'manifest.json'}; D2_DEBUG=1 shows the traceback)", file=sys.stderr)
        if argv is None and (_busy_threads() or server_problem()):
            # the console script: stages still computing are dropped, not awaited
            sys.stdout.flush()
            sys.stderr.flush()
            stop_prefect()
            os._exit(1)
        return 1
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or type(e).__name__ == "TerminationSignal" or interrupted():
            _exit_interrupted(args, where)  # Ctrl-C, SIGTERM (Prefect's TerminationSignal in a flow)
        raise
    finally:
        restore_handlers()  # when called in-process (tests), the caller's handlers are back


def _exit_interrupted(args: argparse.Namespace, where: str) -> None:
    """One line, the Prefect server stopped, exit 130 now (threads still computing a stage are
    dropped, not awaited)."""
    try:
        print(f"d2 {args.command}: interrupted{where} (rerun to continue: finished stages are cached)",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    stop_prefect()
    os._exit(130)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _busy_threads() -> bool:
    """Whether non-daemon threads besides this one are alive (stage tasks still computing)."""
    return any(t is not threading.current_thread() and not t.daemon and t.is_alive() for t in threading.enumerate())


if __name__ == "__main__":
    sys.exit(main())
