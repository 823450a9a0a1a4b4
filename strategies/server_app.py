"""The XPerT ServerApp: `flwr run .` loads ``strategies.server_app:app``.

It reads the run config (``XPerTConfig``), opens (or creates) the pLLM cache and its basis, explains
any pLLM not yet explained (e.g. the cloud pLLMs of ``xpert cache build``), runs the rounds of
``XPerTStrategy`` and writes the results folder (``strategies.results``) after every round.

Relative ``results-dir`` / ``cache-dir`` are resolved against the ServerApp's working directory (the
directory the SuperLink was started in); `xpert simulate` passes absolute paths.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from strategies.pllm_server import PLLMServer
from strategies.results import ResultsWriter
from strategies.xpert import XPerTConfig, XPerTStrategy
from xpert_fl.basis import parse_human_weight
from xpert_fl.explain import ProbeConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = XPerTConfig.from_run_config(context.run_config)
    if cfg.server_threads > 0:  # on a shared CPU, more threads than free cores slow torch down 10x
        torch.set_num_threads(cfg.server_threads)
    out = Path(cfg.results_dir).expanduser().resolve()
    cache_dir = Path(cfg.cache_dir).expanduser().resolve() if cfg.cache_dir else out / "cache"
    writer = ResultsWriter(out, context.run_config, cache_dir)
    server = PLLMServer.open(
        cache_dir,
        cfg.model,
        cfg.summarizer,
        corpus=cfg.corpus,
        num_probe_prompts=cfg.num_probe_prompts,
        probe=ProbeConfig(max_new_tokens=cfg.probe_max_new_tokens, batch_size=cfg.probe_batch_size),
        tau_orth=cfg.tau_orth,
        tau_res=cfg.tau_res,
        orthogonalize=cfg.orthogonalize,
        complete_basis=cfg.complete_basis,
        max_candidates=cfg.max_candidates,
        human_weight=parse_human_weight(cfg.human_weight),
        seed=cfg.seed,
    )
    writer.start(server)
    XPerTStrategy(cfg, server, on_round=writer.on_round).start(grid)
