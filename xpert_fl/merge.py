"""Exact task arithmetic over LoRA adapters (Eq. 4–5): ``θ = θ0 + Σ α_j (θj − θ0)``.

For LoRA, ``θj − θ0`` is ``ΔW_j = s_j B_j A_j`` per module, so the merge is ``ΔW = Σ α_j s_j B_j A_j``.
PEFT's element-wise combinations ("linear", "ties", ...) average A's and B's separately and so add
cross-terms ``B_i A_j``; concatenating ranks ("cat") is exact, and is what this module does:

    A = vstack(A_1, ..., A_n)                  (Σ r_j × in)
    B = hstack(α_1 s_1 B_1, ..., α_n s_n B_n)  (out × Σ r_j)
    B @ A = Σ α_j s_j B_j A_j                  with scaling s = 1 (lora_alpha = r = Σ r_j, no rslora)

A parent that does not target a module contributes a zero block there, so every module of the merged
adapter has the full rank ``Σ r_j`` and the result is a normal PEFT LoRA adapter (loads with
``Adapter.to_peft``, passes ``validate_adapter``). Tensors are float32. Same as PEFT's
``add_weighted_adapter(..., combination_type="cat")`` up to the order of the rank blocks (which does
not change ``B @ A``); PEFT puts the weight on A, this module on B.

Only plain LoRA is merged: per-module ranks or alphas, DoRA, LoRA biases, layer subsets, regex
targets and similar options are refused with an ``AdapterError`` rather than merged approximately.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence

import torch

from xpert_fl.adapters import Adapter, AdapterError, _module_of

MERGE_META_KEY = "xpert_merge"
_PREFIX = "base_model.model."
# Config options whose non-default value makes the "union of target names, one rank per module" form wrong.
_UNSUPPORTED = {
    "use_dora": (None, False),
    "lora_bias": (None, False),
    "bias": (None, "none"),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "layers_to_transform": (None,),
    "layers_pattern": (None,),
    "exclude_modules": (None,),
    "modules_to_save": (None,),
    "target_parameters": (None,),
    "trainable_token_indices": (None,),
    "layer_replication": (None,),
    "use_qalora": (None, False),
}


def merge_adapters(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """The adapter with ``ΔW = Σ α_j ΔW_j`` for every module (rank-concatenation, exact).

    All parents must be plain LoRA adapters of the same base model (``AdapterError`` otherwise);
    weights must be finite and ``>= 0``, one per adapter (``ValueError`` otherwise). The merged
    config is the first parent's with ``r = Σ r_j``, ``lora_alpha = r``, ``use_rslora = False`` and
    ``target_modules`` the union. ``meta["xpert_merge"]`` records the parents' content hashes and weights.
    """
    adapters = list(adapters)
    alphas = _check_weights(weights, len(adapters))
    fingerprints = {a.base_fingerprint for a in adapters}
    if len(fingerprints) != 1:
        raise AdapterError(
            f"cannot merge adapters of different base models (fingerprints {sorted(fingerprints)}): "
            "task arithmetic needs one shared base"
        )
    parents = [_parent_modules(a, j) for j, a in enumerate(adapters)]
    targets = sorted(set().union(*(set(_targets(a.config)) for a in adapters)))
    _check_same_modules(parents, targets)

    ranks = [int(a.config["r"]) for a in adapters]
    r_new = sum(ranks)
    tensors: dict[str, torch.Tensor] = {}
    for module in sorted(set().union(*parents)):
        shape = _module_shape(module, parents)
        a_blocks, b_blocks = [], []
        for adapter, mods, r, alpha in zip(adapters, parents, ranks, alphas, strict=True):
            if module in mods:
                a_j, b_j = mods[module]
                a_blocks.append(a_j.float())
                b_blocks.append(b_j.float() * (alpha * adapter.scaling))
            else:
                a_blocks.append(torch.zeros(r, shape[1]))
                b_blocks.append(torch.zeros(shape[0], r))
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = torch.cat(a_blocks, dim=0).contiguous()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = torch.cat(b_blocks, dim=1).contiguous()

    config = copy.deepcopy(adapters[0].config)
    config.update(r=r_new, lora_alpha=r_new, use_rslora=False, target_modules=targets)
    config.update(rank_pattern={}, alpha_pattern={}, init_lora_weights=True)
    meta = {MERGE_META_KEY: json.dumps({"parents": [a.content_hash for a in adapters], "weights": alphas})}
    return Adapter(config=config, tensors=tensors, base_fingerprint=adapters[0].base_fingerprint, meta=meta)


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    if n == 0:
        raise ValueError("merge_adapters needs at least one adapter")
    if isinstance(weights, str | bytes):
        raise ValueError(f"merge weights must be a sequence of numbers, got {weights!r}")
    weights = list(weights)  # also numpy arrays and tensors
    if len(weights) != n:
        raise ValueError(f"{n} adapters but {len(weights)} weights")
    alphas = []
    for w in weights:
        try:
            value = float(w)
        except (TypeError, ValueError) as err:
            raise ValueError(f"merge weights must be numbers, got {w!r}") from err
        if isinstance(w, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"merge weights must be finite and >= 0, got {list(weights)!r}")
        alphas.append(value)
    return alphas


def _targets(config: dict) -> list[str]:
    targets = config.get("target_modules")
    if not isinstance(targets, list | tuple | set) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"can only merge adapters whose target_modules is a list of module names, got {targets!r}")
    return list(targets)


def _parent_modules(adapter: Adapter, j: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} of one parent, after checking it is a plain, well-formed LoRA adapter."""
    cfg = adapter.config
    if str(cfg.get("peft_type", "LORA")).upper().split(".")[-1] != "LORA":
        raise AdapterError(f"parent {j} is {cfg.get('peft_type')!r}; only LoRA adapters can be merged")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"parent {j}: 'r' must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterError(f"parent {j}: 'lora_alpha' must be a finite number, got {alpha!r}")
    for key, allowed in _UNSUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise AdapterError(f"parent {j}: cannot merge exactly with {key}={cfg[key]!r}")
    targets = set(_targets(cfg))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in adapter.tensors.items():
        module = _module_of(name)
        kind = name.removeprefix(f"{_PREFIX}{module}.")
        if not name.startswith(_PREFIX) or kind not in ("lora_A.weight", "lora_B.weight"):
            raise AdapterError(f"parent {j}: unexpected tensor {name} (only lora_A/lora_B weights merge)")
        if module.rsplit(".", 1)[-1] not in targets:
            raise AdapterError(f"parent {j}: tensor {name} is not in its target_modules {sorted(targets)}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise AdapterError(f"parent {j}: tensor {name} is not finite floating point")
        pairs.setdefault(module, {})[kind] = tensor
    out = {}
    for module, pair in pairs.items():
        a, b = pair.get("lora_A.weight"), pair.get("lora_B.weight")
        if a is None or b is None:
            raise AdapterError(f"parent {j}: module {module} lacks its lora_A or lora_B tensor")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(
                f"parent {j}: module {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, expected rank {r}"
            )
        out[module] = (a, b)
    unused = sorted(targets - {m.rsplit(".", 1)[-1] for m in out})
    if unused:
        raise AdapterError(f"parent {j} targets {unused} but holds no tensors for them")
    return out


def _check_same_modules(parents: list[dict], targets: list[str]) -> None:
    """Parents targeting the same name must cover the same modules, so the union of names is exact."""
    for name in targets:
        seen = [frozenset(m for m in mods if m.rsplit(".", 1)[-1] == name) for mods in parents]
        present = {s for s in seen if s}
        if len(present) > 1:
            raise AdapterError(f"parents adapt different sets of {name!r} modules; cannot merge them exactly")


def _module_shape(module: str, parents: list[dict]) -> tuple[int, int]:
    shapes = {(int(b.shape[0]), int(a.shape[1])) for mods in parents if module in mods for a, b in [mods[module]]}
    if len(shapes) != 1:
        raise AdapterError(f"parents disagree on the shape of {module}: {sorted(shapes)}")
    return shapes.pop()
