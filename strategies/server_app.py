"""The XPerT ServerApp: `flwr run .` loads ``strategies.server_app:app``.

It reads the run config once (``strategies.config.XPerTConfig``: every key, no fallbacks), opens (or
creates) the pLLM cache and its basis, explains any pLLM not yet explained (e.g. the cloud pLLMs of
``xpert cache build``), runs the rounds of ``XPerTStrategy`` and writes the results folder
(``strategies.results``) after every round.

Relative ``results-dir`` / ``cache-dir`` are resolved against the ServerApp's working directory (the
directory the SuperLink was started in); `xpert simulate` passes absolute paths.
"""

from __future__ import annotations

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from strategies.config import XPerTConfig
from strategies.pllm_server import PLLMServer
from strategies.results import ResultsWriter
from strategies.xpert import XPerTStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = XPerTConfig.from_run_config(context.run_config)
    threads = cfg.rounds.server_threads
    if threads > 0:  # on a shared CPU, more threads than free cores slow torch down 10x
        torch.set_num_threads(threads)
    writer = ResultsWriter(cfg.storage.results_path(), context.run_config, cfg.storage.cache_path())
    server = PLLMServer.open(cfg)
    writer.start(server)
    XPerTStrategy(cfg, server, on_round=writer.on_round).start(grid)
