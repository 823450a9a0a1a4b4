"""Memory-capped forward of the summarization LLM ``S``, one decoder layer at a time (paper §5.1, Fig. 10).

A drift embedding needs only one forward pass (no generation, no KV cache), so every decoder layer is
read from the checkpoint, run once over all activations, and freed before the next one is read. What
is held at any moment is the activations plus ONE layer's weights:

1. embed: only the embedding rows of the tokens that occur are read (``safe_open(...).get_slice``);
2. layer ``i``: a decoder layer of the config's own class is built on the meta device, gets exactly
   the ``model.layers.{i}.*`` tensors (``assign=True``: no random init, no copy), runs, and is dropped;
   rotary embeddings and the causal + padding mask are built as ``LlamaModel.forward`` builds them
   (``LlamaRotaryEmbedding``, ``masking_utils.create_causal_mask``);
3. the final norm, then (``next_token_probs``) the output layer on the given states only, reading
   the output matrix (the embedding matrix when ``tie_word_embeddings``) in vocabulary chunks.

The results equal the normal forward (``model.model(ids, mask, position_ids).last_hidden_state`` and
``softmax(model.lm_head(...))``) up to float rounding of the chunked output matmul (tests: atol 1e-4);
the arithmetic is the same modules', with the same attention implementation.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from xpert_fl.models import DEFAULT_SPEC, ModelLoadError, resolve

# model_type -> (decoder layer, rotary embedding, norm) classes whose base-model forward is LlamaModel's.
SUPPORTED = {"llama": (LlamaDecoderLayer, LlamaRotaryEmbedding, LlamaRMSNorm)}

Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # (input_ids, attention_mask, position_ids)


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture has no layer-by-layer runner."""


class LayerwiseRunner:
    """Runs a causal LM's base model one decoder layer at a time from its safetensors checkpoint.

    ``spec`` is anything ``models.resolve`` accepts (embedded name, checkpoint directory, hub id).
    ``stats`` holds the last call's ``load_seconds`` (reading/switching layers) and ``total_seconds``.
    """

    def __init__(
        self,
        spec: str = DEFAULT_SPEC,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",  # what from_pretrained picks on CPU; the mask depends on it
        vocab_chunk: int = 8192,
    ):
        self.path = _checkpoint_dir(resolve(spec))
        self.config = AutoConfig.from_pretrained(self.path, attn_implementation=attn_implementation)
        if self.config.model_type not in SUPPORTED:
            raise UnsupportedModelError(
                f"layer-by-layer mode supports model types {sorted(SUPPORTED)}; {spec!r} is "
                f"{self.config.model_type!r} ({', '.join(self.config.architectures or [])}). "
                f"Load it whole with models.load_model instead."
            )
        self.layer_cls, self.rotary_cls, self.norm_cls = SUPPORTED[self.config.model_type]
        self.dtype, self.vocab_chunk = dtype, vocab_chunk
        self.files = _tensor_files(self.path)
        self.stats: dict[str, float] = {}

    # --- checkpoint access ------------------------------------------------------------------------
    def _tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors named ``prefix*`` (prefix stripped), read now; nothing else is touched."""
        out = {}
        for file in sorted({f for name, f in self.files.items() if name.startswith(prefix)}):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name.startswith(prefix):
                        out[name[len(prefix) :]] = f.get_tensor(name).to(self.dtype)
        if not out:
            raise ModelLoadError(f"checkpoint {self.path} has no tensors named {prefix}*")
        return out

    def _rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_slice(name)[start:stop].to(self.dtype)

    def _module(self, cls, prefix: str, *args) -> torch.nn.Module:
        with torch.device("meta"):
            module = cls(*args)
        module.load_state_dict(self._tensors(prefix), strict=True, assign=True)
        return module.eval()

    # --- forward --------------------------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        name, ids = "model.embed_tokens.weight", input_ids.unique()  # sorted
        with safe_open(self.files[name], framework="pt") as f:
            table = f.get_slice(name)
            rows = torch.cat([table[i : i + 1] for i in ids.tolist()]).to(self.dtype)
        return rows[torch.searchsorted(ids, input_ids)]

    @torch.no_grad()
    def hidden_states_batches(self, batches: Sequence[Batch], layers: int | None = None) -> list[torch.Tensor]:
        """Final-norm states (batch, seq, hidden) of several batches; each layer is read once for all.

        Each batch is ``(input_ids, attention_mask, position_ids)`` exactly as ``LlamaModel.forward``
        takes them (``position_ids=None``: 0..seq-1; pass mask-derived ones for left padding).
        ``layers=k < num_hidden_layers``: stop after k decoder layers and return the residual stream
        there (``output_hidden_states[k]``, no norm); the later layers are never read.
        """
        n_layers = self.config.num_hidden_layers if layers is None else layers
        start = time.perf_counter()
        rope = self.rotary_cls(config=self.config)
        states, extras = [], []  # per batch: activations, and what every layer gets besides them
        for input_ids, attention_mask, position_ids in batches:
            h = self._embed(input_ids)
            if position_ids is None:
                position_ids = torch.arange(h.shape[1]).unsqueeze(0)
            mask = create_causal_mask(self.config, h, attention_mask, None, position_ids=position_ids)
            states.append(h)
            rotary = rope(h, position_ids)
            extras.append(dict(attention_mask=mask, position_ids=position_ids, position_embeddings=rotary))
        load = time.perf_counter() - start  # reading embedding rows counts as loading
        for i in range(n_layers):
            t = time.perf_counter()
            layer = self._module(self.layer_cls, f"model.layers.{i}.", self.config, i)
            load += time.perf_counter() - t
            states = [layer(h, **kw) for h, kw in zip(states, extras, strict=True)]
            del layer
        if n_layers < self.config.num_hidden_layers:
            out = states
        else:
            norm = self._module(self.norm_cls, "model.norm.", self.config.hidden_size, self.config.rms_norm_eps)
            out = [norm(h) for h in states]
        self.stats = {"load_seconds": load, "total_seconds": time.perf_counter() - start}
        return out

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, layers=None) -> torch.Tensor:
        """Equals ``model.model(input_ids, attention_mask, position_ids).last_hidden_state`` (layers=None),
        or its ``hidden_states[layers]`` with ``output_hidden_states=True``."""
        return self.hidden_states_batches([(input_ids, attention_mask, position_ids)], layers)[0]

    def last_states(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """(batch, hidden) final-norm states at the last position (the input of the output layer)."""
        return self.hidden_states(input_ids, attention_mask, position_ids)[:, -1, :]

    @torch.no_grad()
    def next_token_probs(self, states: torch.Tensor) -> torch.Tensor:
        """``softmax(lm_head(states))`` in float32 for (..., hidden) states, reading the matrix in chunks."""
        name = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        vocab = self.config.vocab_size
        logits = [
            states.to(self.dtype) @ self._rows(name, a, min(a + self.vocab_chunk, vocab)).T
            for a in range(0, vocab, self.vocab_chunk)
        ]
        return torch.softmax(torch.cat(logits, dim=-1).float(), dim=-1)

    def fingerprint(self) -> str:
        """``models.model_fingerprint`` of the model this checkpoint loads into, without loading it."""
        h = hashlib.sha256()
        h.update(self.config.model_type.encode())
        names = set(self.files)
        if self.config.tie_word_embeddings:
            names.add("lm_head.weight")
        for name in sorted(names):
            source = "model.embed_tokens.weight" if name not in self.files else name
            with safe_open(self.files[source], framework="pt") as f:
                sl = f.get_slice(source)
                shape = tuple(sl.get_shape())
                head = sl[: -(-64 // math.prod(shape[1:]))].to(self.dtype)  # rows holding the first 64 values
            h.update(f"{name}:{shape}".encode())
            h.update(head.flatten()[:64].to(torch.float32).numpy().tobytes())
        return h.hexdigest()[:16]


def _checkpoint_dir(source: str) -> Path:
    if Path(source).is_dir():
        return Path(source)
    try:  # a hub id: only the config and weights are needed
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:
        raise ModelLoadError(f"cannot find a safetensors checkpoint for {source!r}: {err}") from err


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for single-file and sharded (``*.index.json``) checkpoints."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} holds no *.safetensors checkpoint; layer-by-layer mode reads only those")
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out
