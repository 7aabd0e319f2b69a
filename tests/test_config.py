"""Params: params.yaml validity and completeness, --set overrides, unknown keys, subset hashes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from d2.config import (Params, ParamsError, flatten_params, load_params, params_hash, params_subset_hash,
                       render_params_yaml, with_overrides)

ROOT = Path(__file__).resolve().parents[1]


def leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= leaves(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def _committed(module: str) -> bool:
    """Whether a stage module is in git (a module still being written may add a section early)."""
    import subprocess

    rel = module.replace(".", "/") + ".py"
    r = subprocess.run(["git", "ls-files", "--error-unmatch", rel], cwd=ROOT, capture_output=True)
    return r.returncode == 0 or not (ROOT / ".git").exists()


def test_params_yaml_is_valid_and_has_every_knob_with_a_comment():
    from d2.config import SECTIONS

    params = load_params(ROOT / "params.yaml")
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = set(Params.model_fields) - set(data)
    missing_committed = {s for s in missing if s not in SECTIONS or _committed(SECTIONS[s][0])}
    assert not missing_committed, f"params.yaml lacks sections {missing_committed}"
    from d2.config import ALIASES

    present = {k for k in flatten_params(params) if k.split(".")[0] in data}
    assert {ALIASES.get(k, k) for k in leaves(data)} == present, "params.yaml must spell out every knob"
    # every key line carries a comment
    for line in (ROOT / "params.yaml").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and ":" in line:
            assert "#" in line, f"no comment: {line!r}"


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
    ("run.max_parallel=0", "greater than or equal to 1"),
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


def test_sampling_s0_alias_in_overrides_and_files(tmp_path):
    assert load_params(None, ["sampling.s0=0.3"]).sampling.logistic_s0 == 0.3
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["sampling"]["s0"] = 0.25  # what `dvc exp run -S sampling.s0=0.25` writes
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(data))
    assert load_params(f).sampling.logistic_s0 == 0.25


def test_inconsistent_sections_fail_at_load_time():
    with pytest.raises(ParamsError, match="conditions.num_views = 5 but sampling.num_views"):
        load_params(ROOT / "params.yaml", ["conditions.num_views=5"])
    with pytest.raises(ParamsError, match="conditions.resolution = 64 but sampling.resolution = 16"):
        load_params(ROOT / "params.yaml", ["conditions.resolution=64"])
    p = load_params(ROOT / "params.yaml", ["sampling.num_views=4", "conditions.num_views=4"])
    assert p.sampling.num_views == 4
