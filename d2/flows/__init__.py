"""Prefect flows: ``asset`` (one input), ``benchmark`` (a dataset), ``sweep`` (a grid).

    input ─▶ conditions ─▶ sampling ─▶ fit ─▶ render_eval ─▶ metrics      (asset, per object)
    objects ─▶ [asset ∥ asset ∥ ...] ─▶ tables                            (benchmark)
    grid ─▶ [benchmark(point) ...] sharing unchanged stages ─▶ sweep table  (sweep)

Every flow runs in one :func:`d2.flows.run.run_scope` (run folder, records, MLflow, report) and
drives its stage graphs with :func:`d2.flows.graph.drive`.
"""

from d2.flows.asset import asset_flow, run_asset
from d2.flows.benchmark import benchmark_flow, run_benchmark
from d2.flows.sweep import run_sweep, sweep_flow

__all__ = ["asset_flow", "run_asset", "benchmark_flow", "run_benchmark", "sweep_flow", "run_sweep"]
