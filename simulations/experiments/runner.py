"""The experiment runner: configuration presets, the result record, its schema, and the files it writes.

Every experiment (one module each, see ``simulations.experiments``) returns rows (flat dicts, one per
measurement), a summary and notes; the runner adds the configuration, seed, command, environment
and the paper's reference numbers, validates the record against :data:`RESULT_SCHEMA`, and writes
``<out>/<name>.json``, ``<name>.csv`` (the rows) and ``<name>.png`` (the module's plot).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import jsonschema

SCHEMA_ID = "xpert-fl/experiment/1"
SCALAR = {"type": ["string", "number", "boolean", "null"]}
RESULT_SCHEMA: dict = {
    "type": "object",
    "required": ["schema", "experiment", "title", "config_name", "config", "seed", "corpus", "command", "created",
                 "seconds", "environment", "rows", "summary", "paper", "notes", "figures"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "experiment": {"type": "string"},
        "title": {"type": "string"},
        "config_name": {"type": "string"},
        "config": {"type": "object"},
        "seed": {"type": "integer"},
        "corpus": {"type": "string"},
        "command": {"type": "string"},
        "created": {"type": "string"},
        "seconds": {"type": "number", "minimum": 0},
        "environment": {"type": "object", "required": ["python", "torch", "threads", "machine"]},
        "rows": {"type": "array", "minItems": 1, "items": {"type": "object", "additionalProperties": SCALAR}},
        "summary": {"type": "object"},
        "paper": {"type": "object", "required": ["source"]},
        "notes": {"type": "array", "items": {"type": "string"}},
        "figures": {"type": "array", "items": {"type": "string"}},
    },
}


@dataclass(frozen=True)
class ExperimentConfig:
    """Every knob of the suite; each experiment reads the fields it needs. Defaults: the CPU-small preset
    (overridden per experiment by its ``SMALL``/``FULL`` dicts, then by ``--set key=value``)."""

    styles: tuple[str, ...] = ("sarcastic", "poetic")  # () = every style of the corpus
    similarities: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    users_per_style: int = 1
    max_users: int = 0  # at most this many users (the first ones, style by style); 0 = all
    user_samples: int = 8
    val_samples: int = 8  # held-out samples of the user's style: the fine-tuning validation set
    probe_prompts: int = 16  # paper: 50
    probe_tokens: int = 48
    pllm_steps: int = 20
    max_seq_len: int = 128
    methods: tuple[str, ...] = ("xpert", "scratch", "random", "oracle", "exhaustive", "bo", "hyperband",
                                "text-encoder")
    bo_trials: int = 0  # 0 = the selector's default (half the offered pLLMs)
    finetune_steps: int = 8
    eval_every: int = 2
    gen_prompts: int = 4  # held-out prompts whose generations are scored (BLEU / ROUGE)
    gen_tokens: int = 48
    efficiency_counts: tuple[int, ...] = ()  # samples-to-target scan (empty: off)
    similarity: float = 0.9  # the one similarity of selection-cost / scaling / merging
    cache_sizes: tuple[int, ...] = (4, 16, 64, 256)
    tau_orth: tuple[float, ...] = (0.01, 0.1, 0.5)
    tau_res: tuple[float, ...] = (0.02, 0.2, 0.6)
    paper_basis: bool = False  # Algorithm 1 as published (no Gram-Schmidt, no residual completion)
    human_weight: float = 1.0  # share of the users' reference devices remove (Basis.human_weight)
    mixes: tuple[str, ...] = ("sarcastic+poetic",)
    level_samples: int = 6  # texts per level user (latent-space)
    level_users: int = 2
    level_pllms: bool = False  # latent-space: train one pLLM per level (else: the levels' own data)

    def replace(self, **changes: object) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """``key=value`` strings typed by the config field: tuples are comma-separated, bools true/false."""
    types = {f.name: f.default for f in dataclasses.fields(ExperimentConfig)}
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise ValueError(f"--set expects key=value with key one of {sorted(types)}, got {item!r}")
        default = types[key]
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            out[key] = tuple(kind(v) for v in raw.split(",") if v.strip())
        elif isinstance(default, bool):
            out[key] = raw.strip().lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(raw)
    return out


@dataclass
class Context:
    """One experiment run: where it writes, what it reads, and its configuration."""

    name: str
    out: Path
    config: ExperimentConfig
    config_name: str = "small"
    corpus: str = "builtin"
    seed: int = 0
    source_cache: Path | None = None  # an existing pLLM cache to start from (copied, never written)
    work: Path | None = None  # generations, drifts and the working cache (default <out>/work)
    summarizers: tuple[str, ...] = ()  # summarizer model specs (default: the embedded model)
    threads: int = 1
    command: str = field(default_factory=lambda: shlex.join(["xpert", *sys.argv[1:]]))

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.work = Path(self.work) if self.work else self.out / "work"


@dataclass
class Outcome:
    """What an experiment measured."""

    rows: list[dict]
    summary: dict
    notes: list[str] = field(default_factory=list)


class Experiment(Protocol):
    """What an experiment module provides."""

    NAME: str
    TITLE: str
    SMALL: Mapping[str, object]
    FULL: Mapping[str, object]
    ROW_KEYS: tuple[str, ...]
    PAPER: dict

    def run(self, bench) -> Outcome: ...

    def plot(self, result: dict, path: Path) -> None: ...

    def markdown(self, result: dict) -> str: ...


def preset(module: Experiment, name: str, overrides: Mapping[str, object] | None = None) -> ExperimentConfig:
    """The module's ``small`` or ``full`` configuration, with overrides."""
    presets = {"small": module.SMALL, "full": {**module.SMALL, **module.FULL}}
    if name not in presets:
        raise ValueError(f"--config must be small or full, got {name!r}")
    return ExperimentConfig().replace(**{**presets[name], **(overrides or {})})


def validate(result: dict, row_keys: Sequence[str] = ()) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``result`` is a valid experiment record whose rows
    all carry ``row_keys``."""
    jsonschema.validate(result, RESULT_SCHEMA)
    for i, row in enumerate(result["rows"]):
        missing = [k for k in row_keys if k not in row]
        if missing:
            raise jsonschema.ValidationError(f"row {i} of {result['experiment']} lacks {missing}")


def environment(threads: int) -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "platform": platform.platform()}


def record(module: Experiment, ctx: Context, outcome: Outcome, seconds: float) -> dict:
    """The result record of one run (what ``<name>.json`` holds)."""
    return {
        "schema": SCHEMA_ID, "experiment": module.NAME, "title": module.TITLE, "config_name": ctx.config_name,
        "config": ctx.config.to_json(), "seed": ctx.seed, "corpus": ctx.corpus, "command": ctx.command,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "seconds": seconds,
        "environment": environment(ctx.threads), "rows": outcome.rows, "summary": outcome.summary,
        "paper": module.PAPER, "notes": outcome.notes, "figures": [f"{module.NAME}.png"],
    }


def write(module: Experiment, result: dict, out: Path) -> list[Path]:
    """Validate, then write JSON, CSV and PNG; returns the paths."""
    validate(result, module.ROW_KEYS)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{module.NAME}.{ext}" for ext in ("json", "csv", "png")]
    paths[0].write_text(json.dumps(result, indent=2))
    keys = list(dict.fromkeys(k for row in result["rows"] for k in row))
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(result["rows"])
    module.plot(result, paths[2])
    return paths


def run(module: Experiment, ctx: Context, bench_factory: Callable[[Context], object]) -> dict:
    """Run one experiment end to end and write its files."""
    t0 = time.perf_counter()
    outcome = module.run(bench_factory(ctx))
    result = record(module, ctx, outcome, time.perf_counter() - t0)
    for path in write(module, result, ctx.out):
        print(f"wrote {path}")
    return result
