"""The main job, `xpert simulate`: cloud pLLMs, then a Flower simulation where users build on each other.

1. Cloud: one pLLM per style into ``<out>/cloud-cache`` (``production.build_cache``: small budget,
   resumable, so a second invocation skips it).
2. Flower: a fresh copy of that cache (``<out>/cache``) is the server's starting cache; a SuperLink in
   simulation mode runs the XPerT app with `flwr run` (Ray backend, one virtual SuperNode per user).
   Users arrive a few per round, so later users choose among what earlier users uploaded.
3. Print one line per user-round; the results folder is ``<out>`` (see ``strategies/results.py``).

The default story (4 users, 2 per round, seed 0, arrival order user-2, user-0 | user-1, user-3): users
0 and 3 write in the *elementary* style, for which the cloud has no pLLM; user 0 arrives in round 1
and uploads one, user 3 arrives in round 2 and can start from it. Users 1 (expert) and 2 (poetic)
have a cloud pLLM of their style; the cloud's sarcastic pLLM is a distractor.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from protocol.run_config import pyproject_defaults
from simulations.launch import FlowerProcesses, repo_root
from strategies.results import PLOTS, read_rounds, round_lines, user_round_table
from xpert_fl.data import load_corpus
from xpert_fl.finetune import FinetuneConfig
from xpert_fl.models import DEFAULT_SPEC, load_model
from xpert_fl.production import build_cache

# The embedded-default demo: every value is a run-config key of pyproject.toml.
DEMO_RUN_CONFIG = {  # only what the demo sets differently from pyproject's run config (the product defaults)
    "users-per-round": 2,
    "max-steps": 10,
}


def app_run_config() -> dict:
    """The Flower app's run config in pyproject.toml: the product's defaults, one place for each."""
    return pyproject_defaults(repo_root() / "pyproject.toml")


@dataclass
class SimulateConfig:
    out: str = "results/simulate"
    spec: str = DEFAULT_SPEC
    corpus: str = "builtin"
    cloud_styles: tuple[str, ...] = ("sarcastic", "poetic", "expert")
    similarity: float = 0.9
    cloud_steps: int = 20
    cloud_samples: int = 32
    num_users: int = 4
    seed: int = 0
    threads: int = 1  # torch threads for the cloud pLLMs, the server and each device (1 suits a shared 2-core CPU)
    resume: bool = False  # continue from <out>/cache (what the previous run left) instead of the cloud cache
    timeout: float = 3600.0
    run_config: dict = field(default_factory=dict)  # overrides of DEMO_RUN_CONFIG / pyproject defaults

    def full_run_config(self, out: Path) -> dict:
        return {
            **app_run_config(),
            **DEMO_RUN_CONFIG,
            "model": self.spec,
            "summarizer": self.spec,
            "corpus": self.corpus,
            "seed": self.seed,
            "min-nodes": self.num_users,
            "server-threads": self.threads,
            "device-threads": self.threads,
            **self.run_config,
            "results-dir": str(out),
            "cache-dir": str(out / "cache"),
        }


def build_cloud(cfg: SimulateConfig, out: Path, echo: bool = True) -> Path:
    cloud = out / "cloud-cache"
    base = load_model(cfg.spec)
    # held-out loss at the start and the end only: each evaluation is a pass over the style's test role
    ft = FinetuneConfig(max_steps=cfg.cloud_steps, lr=2e-3, batch_size=4, max_seq_len=128,
                        eval_every=cfg.cloud_steps, patience=1, seed=cfg.seed, threads=cfg.threads)
    build_cache(base, load_corpus(cfg.corpus), cfg.similarity, cloud, ft, styles=cfg.cloud_styles,
                n_train=cfg.cloud_samples, seed=cfg.seed, progress=echo)
    del base
    gc.collect()
    return cloud


def simulate(cfg: SimulateConfig, echo: bool = True) -> list[dict]:
    """Run the main job; returns the user-round records (also in ``<out>/rounds.jsonl``)."""
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say = print if echo else (lambda *a, **k: None)
    cache = out / "cache"
    if cfg.resume and (cache / "index.sqlite").is_file():
        say(f"[1/3] cloud: skipped, continuing from {cache}", flush=True)
    else:
        say(f"[1/3] cloud: {len(cfg.cloud_styles)} pLLMs ({', '.join(cfg.cloud_styles)}) at similarity "
            f"{cfg.similarity}, {cfg.cloud_steps} steps each", flush=True)
        cloud = build_cloud(cfg, out, echo)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(cloud, cache, ignore=shutil.ignore_patterns("writer.lock", "*-wal", "*-shm"))
    run_config = cfg.full_run_config(out)
    say(f"[2/3] flower: local simulation, {cfg.num_users} virtual users, "
        f"{run_config['num-server-rounds']} rounds x {run_config['users-per-round'] or 'all'} users", flush=True)
    federation = {"num-supernodes": cfg.num_users, "client-resources-num-cpus": cfg.threads}
    with FlowerProcesses(out / "logs", workdir=repo_root()) as flower:
        flower.start_superlink(simulation=True)
        status = flower.run(repo_root(), run_config, federation, timeout=cfg.timeout, echo=echo)
    rows = read_rounds(out)
    (out / "simulate.json").write_text(_json({"config": asdict(cfg), "run": status,
                                              "seconds": time.perf_counter() - t0}))
    say("[3/3] what happened (one line per user-round):", flush=True)
    say(user_round_table(rows))
    say(round_lines(out))
    say(f"\n{time.perf_counter() - t0:.0f}s in all; results in {out}/ (rounds.jsonl, summary.csv, "
        f"{', '.join(PLOTS)})")
    return rows


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)
