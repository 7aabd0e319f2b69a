"""Params: params.yaml validity and completeness, --set overrides, unknown keys, subset hashes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from d2.config import (Params, ParamsError, flatten_params, load_params, params_hash, params_subset_hash,
                       render_params_yaml, with_overrides)
from d2.stages.sampling import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]


def leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= leaves(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def test_params_yaml_is_the_defaults_as_d2_params_writes_them():
    """params.yaml is generated (`d2 params > params.yaml`): every knob at its default, one comment each."""
    text = (ROOT / "params.yaml").read_text()
    assert text == render_params_yaml(Params()), "params.yaml is stale: run `d2 params > params.yaml`"
    assert leaves(yaml.safe_load(text)) == set(flatten_params(Params())), "params.yaml must spell out every knob"
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and ":" in line:
            assert "#" in line, f"no comment: {line!r}"
    assert load_params(ROOT / "params.yaml") == load_params(None) == Params()


def test_render_params_yaml_round_trips(tmp_path):
    p = load_params(None, ["run.max_parallel=3"])
    f = tmp_path / "p.yaml"
    f.write_text(render_params_yaml(p))
    assert load_params(f) == p


def test_overrides_are_yaml_typed_and_dotted(tmp_path):
    p = load_params(None, ["run.max_parallel=3", "run.use_cache=false", "run.objects=[a, b]",
                           "run.mlflow_experiment=exp 1"])
    assert p.run.max_parallel == 3 and p.run.use_cache is False
    assert p.run.objects == ["a", "b"] and p.run.mlflow_experiment == "exp 1"
    f = tmp_path / "p.yaml"
    f.write_text("run:\n  max_parallel: 4\n")
    assert load_params(f).run.max_parallel == 4
    assert load_params(f, ["run.max_parallel=1"]).run.max_parallel == 1  # --set wins over the file


@pytest.mark.parametrize("override, message", [
    ("run.max_paralel=3", "Did you mean 'run.max_parallel'"),
    ("nosuchsection.x=1", "unknown parameter 'nosuchsection'"),
    ("run.max_parallel.deeper=1", "is not a section"),
    ("run.max_parallel=0", "run.max_parallel = 0 must be >= 1: stage tasks in flight"),
    ("sampling.logistic_s0=0.3", "unknown parameter 'sampling.logistic_s0'. Did you mean 'sampling.s0'?"),
    ("run.max_parallel=many", "run.max_parallel"),
    ("missing_equals", "key=value"),
    ("run.objects=[unclosed", "not valid YAML"),
])
def test_bad_overrides_are_rejected_clearly(override, message):
    with pytest.raises(ParamsError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_params(None, [override])


def test_unknown_key_in_file_is_rejected(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("run:\n  max_parallel: 2\n  speed: 11\n")
    with pytest.raises(ParamsError, match=r"p.yaml: unknown parameter 'run.speed'"):
        load_params(f)
    f.write_text("- a list\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(f)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_subset_hash_depends_only_on_the_subset():
    p = load_params(None)
    q = with_overrides(p, ["run.max_parallel=5"])
    assert params_subset_hash(p, ["run.retries"]) == params_subset_hash(q, ["run.retries"])
    assert params_subset_hash(p, ["run.max_parallel"]) != params_subset_hash(q, ["run.max_parallel"])
    assert params_subset_hash(p, ["run.retries", "run.cache_dir"]) == params_subset_hash(p, ["run.cache_dir", "run.retries"])
    assert params_hash(p) == params_hash(q)  # run.* does not change results
    with pytest.raises(ParamsError):
        params_subset_hash(p, ["run.nope"])


def test_subset_hash_ignores_knobs_that_cannot_change_results():
    p = load_params(None)
    q = with_overrides(p, ["run.progress=false"])
    assert params_subset_hash(p, ["run"]) != params_subset_hash(q, ["run"])
    assert params_subset_hash(p, ["run"], ignore=["progress"]) == params_subset_hash(q, ["run"], ignore=["progress"])
    assert params_subset_hash(p, ["run"], ignore=["run.progress"]) == params_subset_hash(q, ["run"], ignore=["run.progress"])


def test_sampling_s0_is_one_name_in_overrides_files_and_mlflow(tmp_path):
    assert load_params(None, ["sampling.s0=0.3"]).sampling.s0 == 0.3
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["sampling"]["s0"] = 0.25  # what `dvc exp run -S sampling.s0=0.25` writes
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(data))
    assert load_params(f).sampling.s0 == 0.25
    assert flatten_params(load_params(f))["sampling.s0"] == 0.25  # the MLflow param


def test_a_partial_file_keeps_the_defaults_and_an_empty_section_counts_as_missing(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("fit:\nsampling:\n  k: 15\n")
    assert load_params(f) == Params(sampling=SamplingConfig(k=15))
    f.write_text("priors:\n  device: cpu\n")  # a partial priors section keeps the miniature priors
    assert (load_params(f).priors.backend, load_params(f).priors.clip_preprocess) == ("mini", "torch")


def test_no_effect_is_one_list_from_the_field_marks():
    from d2.config import NO_EFFECT

    assert set(NO_EFFECT) == {"run.progress", "prepare.progress", "conditions.progress", "sampling.progress",
                              "fit.progress", "conditions.chunk_size", "sampling.chunk_size", "metrics.batch_size",
                              "metrics.device", "fit.checkpoint_every"}


def test_inconsistent_sections_fail_at_load_time():
    with pytest.raises(ParamsError, match="conditions.num_views = 5 but sampling.num_views"):
        load_params(ROOT / "params.yaml", ["conditions.num_views=5"])
    with pytest.raises(ParamsError, match="conditions.resolution = 64 but sampling.resolution = 16"):
        load_params(ROOT / "params.yaml", ["conditions.resolution=64"])
    p = load_params(ROOT / "params.yaml", ["sampling.num_views=4", "conditions.num_views=4"])
    assert p.sampling.num_views == 4
