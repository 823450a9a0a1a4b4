"""One figure for the sensitivity runs of selection_accuracy.py: pLLM training x probe answer length.

Each run is a `selection_accuracy.py --variants "response-pool (default)" --fit-weight` output under
benchmarks/results/selection_sensitivity/steps<S>_tokens<T>/ (commands: README, "How robust that is").

    python benchmarks/selection_sensitivity.py

Writes benchmarks/results/selection_sensitivity/sensitivity.png and prints the table as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from selection_accuracy import plot_accuracy

RUNS = {  # label -> run directory
    "20 steps, 48 tokens": "steps20_tokens48",
    "20 steps, 128 tokens": "steps20_tokens128",
    "60 steps, 48 tokens": "steps60_tokens48",
    "60 steps, 128 tokens": "steps60_tokens128",
}
VARIANT = "response-pool (default)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="benchmarks/results/selection_sensitivity")
    args = ap.parse_args()
    root = Path(args.root)
    runs = {label: json.loads((root / d / "selection_accuracy_builtin_0.9.json").read_text())
            for label, d in RUNS.items()}
    first = next(iter(runs.values()))
    merged = {**first, "variants": {label: run["variants"][VARIANT] for label, run in runs.items()}}
    plot_accuracy(merged, root / "sensitivity.png", "pLLM training x probe answer length")
    keys = ("drift_distance_accuracy", "no_offset_drift_accuracy", "self_reported_drift_accuracy",
            "loss_oracle_accuracy")
    table = {label: {**{k: v[k] for k in keys if k in v},
                     **({"held_out_accuracy": v["weight_fit"]["held_out_accuracy"],
                         "fitted_weight": v["weight_fit"]["fitted_weight"]} if "weight_fit" in v else {})}
             for label, v in merged["variants"].items()}
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
