"""Peak memory of the summarizer forward: whole model vs one decoder layer at a time (paper §5.1).

Each mode runs in its own fresh subprocess so peaks do not mix:

- ``baseline``: only the imports both other modes need (Python + torch + transformers);
- ``full``: ``from_pretrained`` of the whole model, then one forward of a ~550-token summarizer prompt;
- ``layerwise``: ``LayerwiseRunner`` on the same prompt.

Peak = ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` in the child (``VmHWM`` is recorded too; the
parent imports nothing heavy before the children ran, so exec does not carry its RSS into theirs).

    python benchmarks/layerwise_memory.py [--spec smollm2-135m-instruct] [--tokens 550]

Prints a JSON object and writes it to benchmarks/results/layerwise_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _peaks() -> dict:
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return {
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "vmhwm_mb": int(hwm.split()[1]) / 1024,
    }


def _prompt_ids(spec: str, tokens: int):
    """A summarizer pair prompt (neutral vs poetic answers from the built-in corpus) of about `tokens` tokens."""
    from transformers import AutoTokenizer

    from xpert_fl.models import resolve
    from xpert_fl.summarizer import ANSWER_PREFIX, INSTRUCTION

    tok = AutoTokenizer.from_pretrained(resolve(spec))
    data = Path(__file__).resolve().parents[1] / "xpert_fl/data/builtin/instructions"

    def text(style: str, n: int) -> str:
        lines = (data / f"{style}.jsonl").read_text().splitlines()
        ids = tok(" ".join(json.loads(line)["response"] for line in lines[:40]), add_special_tokens=False)
        return tok.decode(ids["input_ids"][:n])

    head = tok.apply_chat_template(
        [{"role": "user", "content": INSTRUCTION.format(ref="<REF>", styled="<STYLED>")}],
        tokenize=False,
        add_generation_prompt=True,
    )
    overhead = len(tok(head + ANSWER_PREFIX, add_special_tokens=False)["input_ids"])
    half = (tokens - overhead) // 2
    prompt = head.replace("<REF>", text("neutral", half)).replace("<STYLED>", text("poetic", half)) + ANSWER_PREFIX
    return tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]


def child(mode: str, spec: str, io: Path) -> None:
    """One measurement, in a fresh process: reads io/ids.pt, writes io/<mode>.pt and io/<mode>.json."""
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM

    from xpert_fl.layerwise import LayerwiseRunner
    from xpert_fl.models import resolve

    out: dict = {}
    if mode != "baseline":
        ids = torch.load(io / "ids.pt")
        mask = torch.ones_like(ids)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        start = time.perf_counter()
        if mode == "full":
            model = AutoModelForCausalLM.from_pretrained(resolve(spec), dtype=torch.float32).eval()
            out["load_seconds"] = time.perf_counter() - start
            with torch.no_grad():
                last = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]
                probs = torch.softmax(model.lm_head(last).float(), dim=-1)
        else:
            runner = LayerwiseRunner(spec)
            last = runner.last_states(ids, mask, pos)
            probs = runner.next_token_probs(last)
            out["load_seconds"] = runner.stats["load_seconds"]  # reading/switching layers (paper Table 4)
        out["seconds"] = time.perf_counter() - start
        torch.save({"last": last, "probs": probs}, io / f"{mode}.pt")
    out.update(_peaks())
    (io / f"{mode}.json").write_text(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=550)
    parser.add_argument("--child", choices=["baseline", "full", "layerwise"], help=argparse.SUPPRESS)
    parser.add_argument("--io", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.spec, args.io)

    with tempfile.TemporaryDirectory() as tmp:
        io = Path(tmp)
        here = [sys.executable, __file__, "--spec", args.spec, "--io", tmp]
        # The prompt is made in a child too: this process stays free of torch until every peak is taken.
        code = (
            "import sys, torch; sys.path.insert(0, sys.argv[1]); from layerwise_memory import _prompt_ids; "
            "torch.save(_prompt_ids(sys.argv[2], int(sys.argv[3])), sys.argv[4])"
        )
        bench_dir = str(Path(__file__).resolve().parent)
        subprocess.run(
            [sys.executable, "-c", code, bench_dir, args.spec, str(args.tokens), str(io / "ids.pt")], check=True
        )
        runs = {}
        for mode in ("baseline", "full", "layerwise"):
            subprocess.run([*here, "--child", mode], check=True)
            runs[mode] = json.loads((io / f"{mode}.json").read_text())

        import torch

        full, lw = (torch.load(io / f"{m}.pt") for m in ("full", "layerwise"))
        prompt_tokens = int(torch.load(io / "ids.pt").shape[1])
    d_last = float((full["last"] - lw["last"]).abs().max())
    d_probs = float((full["probs"] - lw["probs"]).abs().max())
    base, f, w = runs["baseline"], runs["full"], runs["layerwise"]
    result = {
        "spec": args.spec,
        "prompt_tokens": prompt_tokens,
        "full_peak_mb": round(f["peak_mb"], 1),
        "layerwise_peak_mb": round(w["peak_mb"], 1),
        "ratio": round(w["peak_mb"] / f["peak_mb"], 3),
        "baseline_peak_mb": round(base["peak_mb"], 1),  # Python + torch + transformers imports only
        "full_model_mb": round(f["peak_mb"] - base["peak_mb"], 1),
        "layerwise_model_mb": round(w["peak_mb"] - base["peak_mb"], 1),
        "model_ratio": round((w["peak_mb"] - base["peak_mb"]) / (f["peak_mb"] - base["peak_mb"]), 3),
        "vmhwm_mb": {m: round(r["vmhwm_mb"], 1) for m, r in runs.items()},
        "full_seconds": round(f["seconds"], 2),
        "full_load_seconds": round(f["load_seconds"], 2),
        "layerwise_seconds": round(w["seconds"], 2),
        "layerwise_load_seconds": round(w["load_seconds"], 2),
        "allclose": bool(d_last <= 1e-4 and d_probs <= 1e-4),
        "max_abs_diff_last_state": d_last,
        "max_abs_diff_probs": d_probs,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "layerwise_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
