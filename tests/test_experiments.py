"""The experiment suite (simulations/experiments): CLI command, result schema, results.md generator; and,
in the slow target, every experiment's smallest configuration end to end on the embedded model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest

from simulations.experiments import experiments, load, names
from simulations.experiments.runner import Context, ExperimentConfig, Outcome, parse_overrides, preset, record, write
from xpert_cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_cli_has_the_experiment_command():
    args = build_parser().parse_args(["experiment", "selection-accuracy", "--out", "x", "--set", "similarities=0.5,0.9",
                                      "--summarizer", "a", "--summarizer", "b"])
    assert args.name == "selection-accuracy" and args.config == "small" and args.summarizer == ["a", "b"]
    assert set(names()) == set(experiments()) and len(names()) == 8
    with pytest.raises(SystemExit):
        build_parser().parse_args(["experiment", "no-such-experiment", "--out", "x"])


def test_overrides_are_typed_by_the_config_field():
    o = parse_overrides(["similarities=0.5,0.9", "users_per_style=3", "paper-basis=true", "styles=poetic"])
    assert o == {"similarities": (0.5, 0.9), "users_per_style": 3, "paper_basis": True, "styles": ("poetic",)}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["nonsense=1"])
    full = preset(load("selection-accuracy"), "full", {"users_per_style": 5})
    assert full.styles == () and full.probe_prompts == 50 and full.users_per_style == 5


def _synthetic(tmp_path: Path) -> tuple[object, dict]:
    """A thresholds result with made-up numbers (its markdown and plot read only rows and summary)."""
    module = load("thresholds")
    rows = [{"mode": m, "swept": sw, "tau_orth": to, "tau_res": tr, "examined": 10, "basis_size": 3, "exhausted": 0,
             "max_residual_ratio": 0.1, "accuracy": 0.5, "ci_low": 0.1, "ci_high": 0.9, "n_users": 2, "n_pllms": 2}
            for m in ("paper", "project") for sw, to, tr in (("tau_orth", 0.1, 0.2), ("tau_orth", 0.5, 0.2),
                                                              ("tau_res", 0.1, 0.2), ("tau_res", 0.1, 0.6))]
    ctx = Context(name=module.NAME, out=tmp_path, config=ExperimentConfig(), command="xpert experiment thresholds")
    return module, record(module, ctx, Outcome(rows, {"n_users": 2, "n_pllms": 2, "chance": 0.5}, ["n"]), 1.0)


def test_result_files_validate_and_are_written(tmp_path):
    module, result = _synthetic(tmp_path)
    paths = write(module, result, tmp_path)
    assert [p.suffix for p in paths] == [".json", ".csv", ".png"] and all(p.stat().st_size > 0 for p in paths)
    assert json.loads(paths[0].read_text())["seed"] == 0
    assert paths[1].read_text().splitlines()[0].startswith("mode,swept,tau_orth")
    for broken in ({**result, "rows": []}, {**result, "schema": "other"}, {**result, "rows": [{"x": [1]}]},
                   {k: v for k, v in result.items() if k != "seed"}):
        with pytest.raises(jsonschema.ValidationError):
            write(module, broken, tmp_path)
    with pytest.raises(jsonschema.ValidationError, match="lacks"):
        write(module, {**result, "rows": [{"mode": "paper"}]}, tmp_path)


def test_results_md_has_every_experiment(tmp_path):
    module, result = _synthetic(tmp_path)
    write(module, result, tmp_path)
    out = tmp_path / "results.md"
    spec = importlib.util.spec_from_file_location("make_results_md", ROOT / "benchmarks" / "make_results_md.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generator.build(tmp_path, out, tmp_path / "harness")
    text = out.read_text()
    assert all(m.TITLE in text for m in experiments().values())
    assert "Command: `xpert experiment thresholds`" in text and "paper: accuracy" in text
    assert text.count("Not run yet") == len(names())  # the selection harness has not run either


# --- slow: the smallest configuration of every experiment, end to end ----------------------------------
TINY = ["styles=sarcastic,poetic", "similarities=0.9", "similarity=0.9", "probe_prompts=2", "probe_tokens=8",
        "user_samples=2", "val_samples=2", "gen_prompts=1", "gen_tokens=8", "finetune_steps=1", "eval_every=1",
        "pllm_steps=1", "max_seq_len=64", "cache_sizes=2,3", "tau_orth=0.1,0.5", "tau_res=0.2,0.6",
        "methods=xpert,random,exhaustive,hyperband", "bo_trials=1", "level_users=2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", names())
def test_smallest_configuration_runs_end_to_end(name, tmp_path_factory):
    from xpert_cli import main

    out = tmp_path_factory.getbasetemp() / "experiments"
    work = tmp_path_factory.getbasetemp() / "experiments-work"  # shared: pLLMs and generations are reused
    tiny = [s for s in TINY if not (name == "latent-space" and s.startswith("styles="))]  # levels are its styles
    sets = [a for s in tiny for a in ("--set", s)]
    assert main(["experiment", name, "--out", str(out), "--work", str(work), *sets]) == 0
    result = json.loads((out / f"{name}.json").read_text())
    assert result["experiment"] == name and result["rows"]
    assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.csv").is_file()
    assert load(name).markdown(result)
