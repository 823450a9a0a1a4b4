"""ONNX Runtime training vs PyTorch: LoRA step time, tokens/s, peak memory, loss agreement.

Both engines train the same fresh LoRA (same seed, so identical start weights) on the same batches of
real text, ``--batch-size`` x ``--seq-len`` tokens each, with ``--threads`` intra-op threads (default 1:
this machine's 2 cores are shared). Each engine runs in its own fresh process, so its memory figures
are its own: RSS after loading the PyTorch model (540 MB fp32; the ORT engine uses it only for the
tokenizer and to prepare the start point, a phone would not hold it), then the peak RSS while the
engine sets up and trains (kernel high-water mark, reset after the load). Per engine: setup seconds
(PyTorch: PEFT wrapping; ORT: session creation + parameter copy), median / mean / min step time after
``--warmup`` steps, tokens/s (at the median step). The machine is shared, so the engines alternate
(``--repeats`` pairs of processes, torch then ORT) and their step times are pooled: contention hits
both alike, and the min is the least disturbed figure. Also: per-step losses of both engines and their largest relative
difference, the artifact sizes (what a phone downloads once vs per pLLM), and the export time and
peak memory if the artifact set was not cached yet (also in a process of its own).

    OMP_NUM_THREADS=1 python benchmarks/ort_vs_torch.py

Prints the JSON and writes benchmarks/results/ort_vs_torch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from xpert_fl.adapters import Adapter
from xpert_fl.data import load_corpus, split_roles
from xpert_fl.device.artifacts import BASE_WEIGHTS, MANIFEST, LoraShape, artifacts_for
from xpert_fl.device.ort_trainer import OrtSession
from xpert_fl.files import atomic_write_text
from xpert_fl.finetune import FinetuneConfig, PeakRSS, TorchSession, collate, encode, prepare_model
from xpert_fl.models import cache_root, load_model

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def batches(loaded, n: int, batch_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of exactly ``seq_len`` tokens per sample (longer samples cut), prompt tokens masked."""
    samples = [s for style in split_roles(load_corpus("builtin"), seed=0)["user"].styles.values() for s in style]
    encoded = [e for e in encode(loaded.tokenizer, samples, seq_len) if len(e["input_ids"]) == seq_len]
    if len(encoded) < n * batch_size:
        raise SystemExit(f"only {len(encoded)} samples reach {seq_len} tokens; lower --seq-len or --steps")
    pad = loaded.tokenizer.pad_token_id
    return [collate(encoded[i * batch_size : (i + 1) * batch_size], pad) for i in range(n)]


def _config(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(rank=args.rank, alpha=2.0 * args.rank, lr=1e-3, threads=args.threads,
                          eval_batch_size=args.batch_size, max_seq_len=args.seq_len)


def _lora(config: FinetuneConfig) -> LoraShape:
    return LoraShape(config.rank, config.alpha, tuple(sorted(config.target_modules)))


def child(args: argparse.Namespace) -> dict:
    """One engine (or the export) in this process; returns its measurements."""
    torch.set_num_threads(args.threads)
    loaded = load_model()
    config = _config(args)
    rss_loaded = _rss_mb()
    peak = PeakRSS()
    t0 = time.perf_counter()
    if args.engine == "export":
        artifacts_for(loaded, _lora(config), args.export_dir)
        return {"export_seconds": time.perf_counter() - t0, "export_peak_rss_mb": peak.mb()}
    data = batches(loaded, args.steps + args.warmup, args.batch_size, args.seq_len)
    torch.manual_seed(config.seed)
    if args.engine == "pytorch":
        session = TorchSession(loaded, None, config)
    else:
        session = OrtSession(loaded, None, config, artifacts_for(loaded, _lora(config)))
    setup = time.perf_counter() - t0
    times, losses = [], []
    for batch in data:
        ts = time.perf_counter()
        nll, n = session.train_step(batch)
        times.append(time.perf_counter() - ts)
        losses.append(nll / n)
    return {
        "engine": args.engine, "setup_seconds": setup, "tokens_per_step": int(data[0]["attention_mask"].sum()),
        "rss_after_model_load_mb": rss_loaded, "peak_rss_mb": peak.mb(), "peak_memory_method": peak.method,
        "losses": losses, "step_seconds": times,
    }


def _pool(runs: list[dict], warmup: int) -> dict:
    """One engine's repeated runs: step times pooled (after warm-up), memory and setup at their worst."""
    timed = [t for r in runs for t in r["step_seconds"][warmup:]]
    tokens = runs[0]["tokens_per_step"]
    return {
        "engine": runs[0]["engine"], "processes": len(runs), "setup_seconds": max(r["setup_seconds"] for r in runs),
        "step_seconds_median": statistics.median(timed), "step_seconds_mean": statistics.mean(timed),
        "step_seconds_min": min(timed), "tokens_per_step": tokens,
        "tokens_per_second": tokens / statistics.median(timed),
        "rss_after_model_load_mb": max(r["rss_after_model_load_mb"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "peak_memory_method": runs[0]["peak_memory_method"],
        "losses": runs[0]["losses"], "step_seconds": [r["step_seconds"] for r in runs],
    }


def _spawn(engine: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--engine", engine], check=True, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="alternating process pairs per engine")
    ap.add_argument("--fresh-export", action="store_true", help="measure an export even if the artifacts are cached")
    ap.add_argument("--engine", choices=["pytorch", "onnxruntime", "export"], help=argparse.SUPPRESS)
    ap.add_argument("--export-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS / "ort_vs_torch.json")
    args = ap.parse_args()
    if args.engine:
        print(json.dumps(child(args)))
        return
    argv = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in ("steps", "warmup", "batch-size", "seq-len",
                                                                     "threads", "rank")]
    loaded = load_model()
    config = _config(args)
    lora = _lora(config)
    export = None
    if not (cache_root() / "ort" / lora.key(loaded.fingerprint) / MANIFEST).is_file():
        export = _spawn("export", argv)
    elif args.fresh_export:
        with tempfile.TemporaryDirectory() as tmp:
            export = _spawn("export", [*argv, f"--export-dir={tmp}"])
    runs: dict[str, list[dict]] = {"pytorch": [], "onnxruntime": []}
    for _ in range(args.repeats):
        for engine, out in runs.items():
            out.append(_spawn(engine, argv))
    torch_run, ort_run = (_pool(runs[e], args.warmup) for e in ("pytorch", "onnxruntime"))
    artifacts = artifacts_for(loaded, lora)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Adapter.from_peft(prepare_model(loaded, None, config), loaded.fingerprint)
        adapter_dir = adapter.save(Path(tmp) / "adapter")
        adapter_file = sum(p.stat().st_size for p in adapter_dir.iterdir())
    rel = max(abs(a - b) / abs(a) for a, b in zip(torch_run["losses"], ort_run["losses"], strict=True))
    sizes = artifacts.sizes()
    report = {
        "what": "LoRA training step, ONNX Runtime training vs PyTorch (same start weights, same batches)",
        "threads": args.threads, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
        "warmup": args.warmup,
        "lora": {"r": config.rank, "alpha": config.alpha, "targets": list(config.target_modules)},
        "model": loaded.spec, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "note": "machine shared with other jobs (one long benchmark on the other core): absolute times are noisy",
        "engines": {"pytorch": torch_run, "onnxruntime": ort_run},
        "speedup_ort_over_torch_median_step": torch_run["step_seconds_median"] / ort_run["step_seconds_median"],
        "max_rel_loss_diff": rel,
        "export": export or "artifacts were cached: export not measured in this run",
        "sizes_bytes": {
            "download_once_per_base_and_lora_shape": sizes,
            "base_weights": sizes[BASE_WEIGHTS],
            "graphs_and_nominal_checkpoint": sum(v for k, v in sizes.items() if k != BASE_WEIGHTS),
            "per_pllm_peft_adapter_files": adapter_file,
            "per_pllm_lora_buffer": 4 * artifacts.manifest["num_trainable"],
        },
    }
    text = json.dumps(report, indent=1)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
