"""The ``d2`` command: prepare, generate, benchmark, sweep, report, evaluate, demo, schedule, params.

Every command reads ``--params`` (default ``params.yaml``), applies ``--set key=value``
overrides and validates everything before any compute. Runs write ``DIR/manifest.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from d2.lifecycle import install_handlers, interrupted, restore_handlers, server_problem, start_prefect, stop_prefect

STAGES_PER_OBJECT = 5  # conditions, sampling, fit, render_eval, metrics: what the progress display counts


_print = functools.partial(print, flush=True)


def _run_flow(args: argparse.Namespace, p: Any, total: int, title: str, run: Callable[[], dict],
              describe: Callable[[dict], Iterable[str]]) -> None:
    """``run()`` (a flow) with the run folder ``--out`` locked first (refused at once when another
    live run holds it; the flow adopts the lock), then the Prefect server started, under a progress
    display of ``total`` stages; then ``describe(result)`` and where the run's manifest, report and
    MLflow run are."""
    from d2.preflight import hold_run_folder
    from d2.execution.progress import ProgressDisplay

    hold_run_folder(args.out)
    start_prefect()
    with ProgressDisplay(total, title, p.run.progress):
        result = run()
    m = json.loads(Path(result["manifest"]).read_text())
    page, uri, run_id = result.get("report"), os.environ.get("MLFLOW_TRACKING_URI", ""), result.get("mlflow_run_id")
    ui = f".venv/bin/mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"mlflow ui ({uri})"
    for line in ["", *describe(result),
                 f"run folder: {result['run_dir']} (stages computed {m['totals']['computed']}, cached "
                 f"{m['totals']['cached']}; wall {m.get('flow_wall_seconds', m['wall_seconds']):.1f} s)",
                 f"report: {page} (open it in a browser; no server needed)" if page else
                 "report: not written (see above)",
                 f"MLflow: run {run_id} in {uri}\n  browse: {ui}" if run_id else "MLflow: off (run.mlflow=false)"]:
        _print(line)


# ---------------------------------------------------------------------------------------
# Commands


def cmd_params(args: argparse.Namespace, p: Any) -> None:
    """Print the validated params (YAML with comments)."""
    from d2.config import render_params_yaml

    sys.stdout.write(render_params_yaml(p))


def cmd_prepare(args: argparse.Namespace, p: Any) -> None:
    """Write the procedural mini-benchmark."""
    out = Path(args.out or p.run.data_dir)
    if args.like == "consistent4d":
        from d2.world.benchmark import generate_consistent4d_shape

        generate_consistent4d_shape(out, progress=p.run.progress)
        _print(f"a dataset shaped as Consistent4D's test set (7 objects, 32 RGBA frames, 4 views, 512 px) written "
               f"to {out}")
    else:
        prepare_dataset(p, out)
        _print(f"mini-benchmark written to {out}")


def prepare_dataset(p: Any, out: Path) -> Path:
    """Generate the procedural benchmark into ``out`` with ``p.prepare``."""
    import torch

    from d2.world.benchmark import generate_benchmark

    torch.set_num_threads(max(1, p.run.threads_per_task * p.run.max_parallel))
    return generate_benchmark(out, p.prepare.model_copy(update={"progress": p.prepare.progress and p.run.progress}))


def cmd_generate(args: argparse.Namespace, p: Any) -> None:
    """One input to a 4D asset."""
    from d2.flows import run_asset

    src = Path(args.input)  # its existence and the object name: checked by the preflight

    def describe(result: dict) -> Iterator[str]:
        outputs = result["outputs"]
        with contextlib.suppress(OSError, KeyError, ValueError):
            conditions = json.loads((Path(outputs["conditions"]) / "conditions.json").read_text())
            if reading := str((conditions.get("input_reading") or {}).get("summary", "")):
                yield f"input read as: {reading}"
        yield from (f"  {stage}: {path}" for stage, path in outputs.items())
        yield f"turntable video: {Path(outputs['fit']) / 'turntable.mp4'}"

    _run_flow(args, p, STAGES_PER_OBJECT - (0 if args.gt else 1), f"generate {src.name}",
              lambda: run_asset(src, args.out, p, gt_dir=args.gt, name=args.name), describe)


def cmd_benchmark(args: argparse.Namespace, p: Any) -> None:
    """A dataset: one asset per object, then the tables."""
    from d2.flows import run_benchmark
    from d2.validation import dataset_objects

    data = Path(args.data or p.run.data_dir)
    total = len(dataset_objects(data, p.run.objects)) * STAGES_PER_OBJECT + 1
    _run_flow(args, p, total, f"{args.command} {data.name}", lambda: run_benchmark(data, args.out, p),
              lambda r: [r.get("table") or json.dumps(r.get("summary", {}), indent=2), f"tables: {r['results_dir']}",
                         "turntable videos:", *(f"  {obj}: {path}" for obj, path in r["videos"].items())])


def cmd_demo(args: argparse.Namespace, p: Any) -> None:
    """Prepare the mini-benchmark if missing, run the benchmark on CPU, print the results."""
    from d2.validation import dataset_objects

    data = Path(args.data or p.run.data_dir)
    t0 = time.perf_counter()
    if not (data / "meta.json").exists():
        _print(f"preparing the procedural mini-benchmark in {data} ...")
        prepare_dataset(p, data)
    objects = dataset_objects(data, p.run.objects)
    _print(f"benchmark: {len(objects)} objects ({', '.join(objects)}), backends "
           f"video={p.priors.video_backend or p.priors.backend} multiview={p.priors.multiview_backend or p.priors.backend}, "
           f"V={p.sampling.num_views} F={p.sampling.num_frames} {p.sampling.resolution}px, "
           f"{p.sampling.num_steps} steps, fit {p.fit.iterations} it, max_parallel={p.run.max_parallel}")
    cmd_benchmark(args, p)
    _print(f"demo total {time.perf_counter() - t0:.1f} s")


def cmd_sweep(args: argparse.Namespace, p: Any) -> None:
    """A grid of overrides: one benchmark per point, sharing unchanged stages."""
    from d2.flows import run_sweep
    from d2.validation import dataset_objects, grid_points, parse_grid

    grid = parse_grid(args.grid)
    data = Path(args.data or p.run.data_dir)
    points = len(grid_points(p, grid))
    total = points * (len(dataset_objects(data, p.run.objects)) * STAGES_PER_OBJECT + 1)
    _run_flow(args, p, total, f"sweep {points} points", lambda: run_sweep(data, args.out, p, grid),
              lambda r: [r["table"]])


def cmd_report(args: argparse.Namespace, p: Any) -> None:
    """Rebuild the tables of a benchmark or sweep folder (no compute)."""
    from d2.reports.html import build_html_report
    from d2.reports.run_report import build_report

    out = build_report(Path(args.run), Path(args.out) if args.out else None,
                       Path(args.metrics) if args.metrics else None)
    _print(Path(out["table_path"]).read_text())
    page = build_html_report(Path(args.run), Path(out["out_dir"]))
    _print(f"report written to {out['out_dir']} (open {page} in a browser)")


def cmd_evaluate(args: argparse.Namespace, p: Any) -> None:
    """Score predictions against ground truth (Consistent4D layout)."""
    from d2.eval.scoring import evaluate_command

    evaluate_command(args.pred, args.gt, out=args.out, require_metrics=args.require_metrics or (),
                     protocol=p.protocol, metrics_cfg=p.metrics, progress=p.run.progress, print_fn=_print)


def cmd_schedule(args: argparse.Namespace, p: Any) -> None:
    """Serve the benchmark on a cron schedule from this process, or register it for a work pool."""
    from d2.flows.schedule import build_schedule, serve_schedule

    dep = build_schedule(p, Path(args.data or p.run.data_dir), Path(args.out), args.cron, args.name, args.timezone,
                         args.work_pool)
    api = os.environ.get("PREFECT_API_URL")
    where = f"registered for work pool '{args.work_pool}'" if args.work_pool else "served from this process"
    api = f"Prefect API {api}" if api else "no PREFECT_API_URL: an ephemeral server, no UI"
    _print(f"deployment '{dep.name}' of the benchmark on '{args.cron}' into {args.out}, on run.runner="
           f"{p.run.runner}, {where} ({api})")
    serve_schedule(dep)


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

    def command(fn: Callable[[argparse.Namespace, Any], None], help: str, **flags: dict[str, Any]) -> None:
        sp = sub.add_parser(fn.__name__.removeprefix("cmd_"), help=help)
        for flag, kwargs in flags.items():
            sp.add_argument("--" + flag.replace("_", "-"), **kwargs)
        _common(sp)
        sp.set_defaults(fn=fn)

    data = {"help": "dataset folder (default: run.data_dir)"}
    run_dir = {"required": True, "help": "run folder"}
    command(cmd_prepare, "write the procedural mini-benchmark (Consistent4D layout)",
            out={"help": "dataset folder (default: run.data_dir)"},
            like={"choices": ["mini", "consistent4d"], "default": "mini",
                  "help": "mini: the procedural mini-benchmark (section prepare); consistent4d: the file layout of "
                          "Consistent4D's released test set (its 7 object names, 32-frame RGBA inputs, 4 x 32 "
                          "ground-truth frames, 512 px) with procedural content, for `--rehearse`"})
    command(cmd_generate, "one input (image, video, frames folder, orbit folder) to a 4D asset",
            input={"required": True, "help": "image file, video file, folder of frames, or orbit folder"},
            out=run_dir, gt={"help": "ground-truth folder (eval_{k}/{i}.png) to score the asset against"},
            name={"help": "object name (default: the input's name)"})
    command(cmd_benchmark, "a dataset: one asset per object (in parallel), then the tables", data=data, out=run_dir)
    command(cmd_sweep, "a grid of overrides: one benchmark per point, sharing unchanged stages",
            grid={"action": "append", "required": True, "metavar": "KEY=V1,V2,...",
                  "help": "one grid axis, e.g. --grid sampling.s0=0.3,0.5; repeatable (the grid is the product)"},
            data=data, out={"required": True, "help": "sweep folder"})
    command(cmd_report, "rebuild the tables of a benchmark or sweep folder (no compute)",
            run={"required": True, "help": "benchmark or sweep folder (with manifest.json)"},
            out={"help": "report folder (default: RUN/report)"},
            metrics={"help": "write the headline numbers here (default: OUT/metrics.json)"})
    command(cmd_evaluate, "score predictions against ground truth (Consistent4D layout)",
            pred={"required": True, "help": "predictions: <pred>/<object>/eval_{k}/{i}.png"},
            gt={"required": True, "help": "ground truth: <gt>/<object>/eval_{k}/{i}.png"},
            out={"help": "results folder (default: PRED/eval)"},
            require_metrics={"help": "comma list of metrics that must be available, e.g. clip,lpips"})
    command(cmd_demo, "the benchmark on the procedural mini-benchmark with the CPU backends",
            data={"help": "dataset folder (default: run.data_dir; prepared when missing)"},
            out={"default": "runs/demo", "help": "run folder (default: runs/demo)"})
    command(cmd_schedule, "run the benchmark on a cron schedule (e.g. nightly), on run.runner",
            cron={"required": True, "help": 'cron expression, e.g. "0 3 * * *"'}, data=data,
            out={"required": True, "help": "run folder of every scheduled run"},
            name={"default": "nightly-benchmark", "help": "deployment name"},
            timezone={"help": "IANA timezone of the cron expression (default UTC)"},
            work_pool={"metavar": "NAME", "help": "register the deployment for this Prefect work pool (its workers "
                                                  "run it; d2 installed there) instead of serving it from this process"})
    command(cmd_params, "print the validated params as commented YAML")
    return ap


def quiet_library_bars(no_progress: bool) -> None:
    """The run shows one progress display: the Hugging Face libraries' own bars ("Loading weights")
    are off, and with ``--no-progress`` every tqdm bar is (``TQDM_DISABLE``). Set before the
    libraries are imported (they read it then)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if no_progress:
        os.environ["TQDM_DISABLE"] = "1"


def _preflight(args: argparse.Namespace) -> Any:
    """The validated params (None for ``d2 report``, which reads a run folder), inputs and datasets
    checked before the command starts (:mod:`d2.preflight`: the data, then the machine); warnings on stderr."""
    from d2.config import load_params, overlay_overrides, preset_path
    from d2.preflight import preflight

    if args.command == "report":
        return None
    overrides = [*(overlay_overrides() if args.rehearse else []), *args.set,
                 *(["run.progress=false"] if args.no_progress else [])]
    params = load_params(preset_path(args.preset) if args.preset else args.params, overrides)
    for warning in preflight(args.command, vars(args), params):
        print(f"d2 {args.command}: warning: {warning}", file=sys.stderr)
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``d2`` console script."""
    args = build_parser().parse_args(argv)
    from d2.env import setup_env

    setup_env()  # before Prefect or MLflow is imported
    quiet_library_bars(args.no_progress)
    from d2.config import ParamsError
    from d2.validation import InputError

    out = getattr(args, "out", None)
    where = f"; what ran is in {Path(out) / 'manifest.json'}" if out else ""
    if threading.current_thread() is threading.main_thread():
        install_handlers(f"d2 {args.command}: interrupted again: stopped at once{where}")
    try:
        args.fn(args, _preflight(args))
        sys.stdout.flush()  # a closed pipe fails here, where it is handled, not at exit
        return 0
    except BrokenPipeError:  # the reader went away (`d2 params | head`): what it read is all it wanted
        with contextlib.suppress(OSError, ValueError):  # no failing flush at exit: stdout to /dev/null
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or type(e).__name__ == "TerminationSignal" or interrupted():
            _exit_interrupted(args, where)  # Ctrl-C, SIGTERM, or an error they caused (a library cut short)
        if os.environ.get("D2_DEBUG") or not isinstance(e, Exception):
            raise
        if isinstance(e, (ParamsError, InputError)):
            print(f"d2 {args.command}: {e}", file=sys.stderr)
            return 2
        print(f"d2 {args.command}: {server_problem() or f'{type(e).__name__}: {e}'}", file=sys.stderr)
        if out and (Path(out) / "manifest.json").is_file():
            print(f"(what ran is in {Path(out) / 'manifest.json'}; D2_DEBUG=1 shows the traceback)", file=sys.stderr)
        busy = any(t is not threading.current_thread() and not t.daemon and t.is_alive() for t in threading.enumerate())
        if argv is None and (busy or server_problem()):
            # the console script: stages still computing in other threads are dropped, not awaited
            sys.stdout.flush()
            sys.stderr.flush()
            stop_prefect()
            os._exit(1)
        return 1
    finally:
        restore_handlers()  # when called in-process (tests), the caller's handlers are back


def _exit_interrupted(args: argparse.Namespace, where: str) -> None:
    """One line, the Prefect server stopped, exit 130 now (threads still computing a stage are
    dropped, not awaited)."""
    with contextlib.suppress(OSError, ValueError):
        print(f"d2 {args.command}: interrupted{where} (rerun to continue: finished stages are cached)",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
    stop_prefect()
    os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
