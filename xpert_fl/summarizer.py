"""The summarizer (paper §3.1, Fig. 6): drift embeddings and candidate words.

The summarization LLM ``S`` is shown a reference text (base model) and a styled text (pLLM or user)
and asked for ONE adjective naming how the style of the second differs. In the paper, the drift
embedding is ``S``'s final hidden state at the position that predicts that adjective ("slot"). An
answer prefix opens the adjective slot (without it the next token is "The"/"Text"), and the top
next-token words there are the candidate words of Algorithm 1 in every embedding mode.

Where the vectors come from (``SummarizerConfig.embedding``):

* ``sentence`` (default): a small sentence encoder (:mod:`xpert_fl.encoder`) embeds each text; a set
  of texts is the normalised mean of their embeddings. ``S`` still names the candidate words, and the
  words' sub-vectors are the encoder's embeddings of a sentence using them, so the basis explains
  vectors in the encoder's space. Why: on human-written corpora the 135M summarizer's own states
  (the pools below) told the users' categories apart far less well than the encoder, with the
  parameters chosen on another corpus (benchmarks/selection_harness.py; benchmarks/results.md).
* ``response-pool``: ``S``'s hidden states at a late intermediate layer, mean-pooled over the text's
  tokens in its own context (the chat turn answering its prompt, or the prefix it continues);
  ``mean-pool``: the same without the context.
* ``slot`` (the paper's): the state at the adjective slot of a (reference, styled) pair. Too little of
  the style survives in the slot of a summarizer this small.

Hidden states of an LLM share a large common component (raw vectors have cosine ~0.99), so every
embedding is calibrated: the slot by subtracting the embedding of a *null drift* (a reference text
compared with another reference text), the pools by subtracting the references' pool.

A few dimensions of the residual stream carry most of its magnitude ("massive activations") and
would decide every distance, so the LLM's pools are also *whitened*: each dimension is divided by its
spread over a fixed set of neutral calibration texts (the built-in corpus's neutral answers in
their chat turns). The scale depends only on the summarizer, so server and devices agree on it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from xpert_fl.chat import chat_prompt
from xpert_fl.data.corpus import load_corpus
from xpert_fl.encoder import TextEncoder, default_encoder
from xpert_fl.layerwise import LayerwiseRunner
from xpert_fl.models import LoadedModel

INSTRUCTION = (
    "Text A and Text B respond to the same request.\n\nText A:\n{ref}\n\nText B:\n{styled}\n\n"
    "Use one adjective to describe how the language style of Text B differs from Text A."
)
ANSWER_PREFIX = "Compared to Text A, the language style of Text B is more"
WORD_PROMPT = "Use one adjective to summarize the meaning of \"{word}\" when it describes a language style."
WORD_TEXT = "This text is written in a {word} style."  # pools: a word's direct-route text
# a sentence encoder's embedding; the paper's adjective slot; S's pooled states alone, or in context
EMBEDDINGS = ("sentence", "slot", "mean-pool", "response-pool")
# Reference adjectives: their mean direct-route vector is the common component removed from word vectors.
REFERENCE_WORDS = (
    "formal casual concise verbose friendly hostile poetic plain technical simple sarcastic sincere "
    "persuasive neutral informative vague elementary expert playful serious emotional dry lyrical blunt"
).split()
POOL_MEMO = 16384  # pools memoized per summarizer at most (2.3 KB each at hidden size 576)
_STOP = frozenset(
    "the and for with that this than more less very much text style language like about from into "
    "over such just also only both each other same different".split()
)


@dataclass(frozen=True)
class SummarizerConfig:
    """How drift embeddings are computed; the defaults are what measured best (benchmarks/)."""

    embedding: str = "sentence"  # "sentence" | "slot" (paper) | "mean-pool" | "response-pool"
    encoder: str = ""  # sentence: a sentence-encoder directory ("": the packaged all-MiniLM-L6-v2)
    calibrate: bool = True  # subtract the null-drift (slot) or the references' pool (pools)
    layer: float = 0.8  # pools: depth read, as a fraction of the decoder layers (1.0: the final norm)
    candidate_pairs: int = 8  # pools: slot prompts run (on the first pairs) only to name candidate words
    whiten: bool = True  # pools: divide each dimension by its spread over neutral calibration texts
    calibration_texts: int = 32  # pools: neutral texts the whitening scale is measured on
    max_text_tokens: int = 96  # each text is cut to this many tokens before it is shown to S
    batch_size: int = 4
    n_candidates: int = 64  # candidate words kept per embedding
    instruction: str = INSTRUCTION
    answer_prefix: str = ANSWER_PREFIX

    def __post_init__(self) -> None:
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if (self.max_text_tokens < 8 or self.batch_size < 1 or self.n_candidates < 1 or self.candidate_pairs < 1
                or self.calibration_texts < 2):
            raise ValueError(
                "max_text_tokens >= 8, batch_size >= 1, n_candidates >= 1, candidate_pairs >= 1 and "
                "calibration_texts >= 2 are required"
            )
        if not 0.0 < self.layer <= 1.0:
            raise ValueError(f"layer is a fraction of the decoder layers in (0, 1], got {self.layer}")


@dataclass
class Drift:
    """One drift embedding with the summarizer's candidate words for it (descending probability)."""

    vector: np.ndarray
    candidates: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    # pooled embeddings: the styled texts' own embedding, before the reference is removed (what a
    # pLLM's self-report is checked against: ``explain.trusted_drift``); None for the slot
    styled: np.ndarray | None = None


class Summarizer:
    """Wraps a loaded summarization LLM; computes drift embeddings, candidate words and word vectors."""

    def __init__(
        self, loaded: LoadedModel, config: SummarizerConfig | None = None, runner: LayerwiseRunner | None = None
    ):
        """``runner``: memory-capped mode (paper §5.1), S run one decoder layer at a time; same vectors."""
        self.loaded = loaded
        self.runner = runner
        self.config = config or SummarizerConfig()
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self._word_vocab = _word_vocabulary(self.tokenizer)
        self._null: dict[tuple[str, ...], np.ndarray] = {}
        self._word_center: np.ndarray | None = None
        self._subvectors: dict[str, np.ndarray] = {}  # a word's sub-vector never changes for one summarizer
        self._scale: np.ndarray | None = None
        self._pools: dict[tuple[str, str], np.ndarray] = {}  # (context, text) -> unwhitened pool
        self.encoder: TextEncoder | None = None
        if self.config.embedding == "sentence":
            self.encoder = TextEncoder(self.config.encoder) if self.config.encoder else default_encoder()

    @property
    def fingerprint(self) -> str:
        """Identity of the embedding space: the model plus the settings that shape vectors."""
        c = self.config
        if self.encoder is not None:
            return f"{self.loaded.fingerprint}:sentence:{self.encoder.fingerprint[:16]}:{int(c.calibrate)}"
        pool = f":L{self.layer_index}" + (f":w{c.calibration_texts}" if c.whiten else "") if self.pooled else ""
        return f"{self.loaded.fingerprint}:{c.embedding}{pool}:{int(c.calibrate)}:{c.max_text_tokens}"

    @property
    def pooled(self) -> bool:
        """Whether vectors are pools of hidden states (not the paper's slot state)."""
        return self.config.embedding != "slot"

    @property
    def dim(self) -> int:
        if self.encoder is not None:
            return int(self.encoder.model.config.hidden_size)
        return int(self.model.config.hidden_size)

    @property
    def layer_index(self) -> int:
        """Hidden-state index the pools read (``output_hidden_states[k]``; k = n_layers: final norm)."""
        n = int(self.model.config.num_hidden_layers)
        return max(1, min(n, round(self.config.layer * n)))

    # --- prompts ------------------------------------------------------------------------------
    def _clip(self, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.config.max_text_tokens]
        return self.tokenizer.decode(ids).strip()

    def _pair_prompt(self, ref: str, styled: str) -> str:
        user = self.config.instruction.format(ref=self._clip(ref), styled=self._clip(styled))
        return self._chat(user)

    def _chat(self, user: str) -> str:
        head = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return head + self.config.answer_prefix

    # --- forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def _final_states(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Final-norm states at the last position and the next-token probabilities there."""
        vecs, probs = [], []
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            for start in range(0, len(texts), self.config.batch_size):
                chunk = list(texts[start : start + self.config.batch_size])
                enc = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                mask = enc["attention_mask"]
                last = self._hidden(enc["input_ids"], mask, None)[:, -1, :]
                if self.runner is None:
                    probs.append(torch.softmax(self.model.lm_head(last).float(), dim=-1))
                else:
                    probs.append(self.runner.next_token_probs(last))
                vecs.append(last.float())
        finally:
            self.tokenizer.padding_side = side
        return torch.cat(vecs).numpy(), torch.cat(probs).numpy()

    def _pooled(self, contexts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """Per-text vectors in the embedding's space: the sentence encoder's (contexts unused), or S's
        pools, whitened by the calibration scale when ``whiten`` is set."""
        if self.encoder is not None:
            return self.encoder.encode(list(texts))
        pools = self._pool_states(contexts, texts)
        return pools / self.scale() if self.config.whiten else pools

    def scale(self) -> np.ndarray:
        """Per-dimension spread (std) of the pools of the neutral calibration texts, measured once."""
        if self._scale is None:
            ctx, texts = _calibration_texts(self.tokenizer, self.config.calibration_texts)
            std = self._pool_states(self._contexts(ctx, len(texts)), texts).std(0).astype(np.float64)
            # a dimension that never varies (dead) must not blow up: floor at a small fraction of the typical spread
            self._scale = np.maximum(std, 1e-3 * float(np.median(std)) + 1e-12).astype(np.float32)
        return self._scale

    @torch.no_grad()
    def _pool_states(self, contexts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """Mean of the states at ``layer_index`` over each text's tokens, the text following its context.

        Memoized per (context, text): a text pools the same every time, and the same base answers and
        calibration texts are pooled for every drift."""
        keys = list(zip(contexts, texts, strict=True))
        todo = list(dict.fromkeys(k for k in keys if k not in self._pools))
        if len(self._pools) + len(todo) > POOL_MEMO:
            self._pools.clear()
            todo = list(dict.fromkeys(keys))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(todo), self.config.batch_size):
            chunk = todo[start : start + self.config.batch_size]
            rows, lengths = [], []
            for ctx, text in chunk:
                sep = " " if ctx and not ctx[-1].isspace() else ""
                ids = self.tokenizer(sep + text, add_special_tokens=False)["input_ids"][: self.config.max_text_tokens]
                ctx_ids = self.tokenizer(ctx, add_special_tokens=False)["input_ids"] if ctx else []
                rows.append(ctx_ids + ids)
                lengths.append(len(ids))
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            hidden = self._hidden(input_ids, mask, self.layer_index)
            for i, (key, n) in enumerate(zip(chunk, lengths, strict=True)):
                self._pools[key] = hidden[i, width - n :, :].float().mean(0).numpy()
        return np.stack([self._pools[k] for k in keys])

    def _hidden(self, input_ids: torch.Tensor, mask: torch.Tensor, layers: int | None) -> torch.Tensor:
        """States after ``layers`` decoder layers (None or all: after the final norm), left padding aware."""
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        final = layers is None or layers >= self.model.config.num_hidden_layers
        if self.runner is not None:
            return self.runner.hidden_states(input_ids, mask, position_ids, layers=None if final else layers)
        out = self.model.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=not final
        )
        return out.last_hidden_state if final else out.hidden_states[layers]

    def _raw(
        self, refs: Sequence[str], styled: Sequence[str], contexts: Sequence[str] | None, candidates: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-pair vectors and the slot's next-token probabilities (for candidate words; pools skip
        the slot prompts when no candidates are wanted)."""
        pairs = [self._pair_prompt(r, s) for r, s in zip(refs, styled, strict=True)]
        if not self.pooled:
            return self._final_states(pairs)
        probs = self._final_states(pairs[: self.config.candidate_pairs])[1] if candidates else None
        return self._pooled(self._contexts(contexts, len(styled)), styled), probs

    def _mean(self, vectors: np.ndarray) -> np.ndarray:
        """One vector for a set of texts: their mean (normalised for the sentence encoder, whose
        similarity is the cosine, so that a set of 8 texts and one of 200 sit on the same sphere)."""
        mean = vectors.mean(0)
        return mean / max(float(np.linalg.norm(mean)), 1e-12) if self.encoder is not None else mean

    def _contexts(self, contexts: Sequence[str] | None, n: int) -> list[str]:
        if self.config.embedding == "mean-pool" or contexts is None:
            return [""] * n
        if len(contexts) != n:
            raise ValueError(f"need one context per text, got {len(contexts)} for {n} texts")
        return list(contexts)

    # --- public -------------------------------------------------------------------------------
    def null_vector(self, refs: Sequence[str], contexts: Sequence[str] | None = None) -> np.ndarray:
        """What a drift of zero embeds as: for the slot, each reference compared with the next reference
        (no style change); for the pools, the references' own pool (in their contexts)."""
        key = (tuple(refs), None if contexts is None else tuple(contexts))
        if key not in self._null:
            if not self.pooled:
                shifted = list(refs[1:]) + list(refs[:1])
                self._null[key] = self._raw(refs, shifted, None)[0].mean(0)
            else:
                self._null[key] = self._mean(self._pooled(self._contexts(contexts, len(refs)), refs))
        return self._null[key]

    def drift(
        self, refs: Sequence[str], styled: Sequence[str], contexts: Sequence[str] | None = None,
        candidates: bool = True,
    ) -> Drift:
        """Drift embedding of styled texts against reference texts (same length, paired by index).

        ``contexts[i]``: the text both ``refs[i]`` and ``styled[i]`` continue (a chat prompt rendered
        by ``chat.chat_prompt``, or a plain prefix); read by ``response-pool`` only.
        ``candidates=False``: no candidate words (a device only needs the vector; the pools then skip
        the slot prompts entirely).
        """
        if len(refs) != len(styled) or not refs:
            raise ValueError(f"need equally many reference and styled texts (> 0), got {len(refs)} and {len(styled)}")
        if any(not (t or "").strip() for t in styled):
            raise ValueError("styled texts must be non-empty")
        vecs, probs = self._raw(refs, styled, contexts, candidates)
        vector = self._mean(vecs) if self.pooled else vecs.mean(0)
        own = vector.astype(np.float32) if self.pooled else None
        if self.config.calibrate:
            vector = vector - self.null_vector(refs, contexts)
        if not np.isfinite(vector).all():
            raise ValueError("drift embedding is not finite")
        words, p = self.candidate_words(probs.mean(0)) if probs is not None else ([], [])
        return Drift(vector.astype(np.float32), words, p, own)

    def embed(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> np.ndarray:
        """Where a set of texts sits in the embedding space: the mean of their pools (whitened like
        drifts), each text read after its own context (``contexts[i]``: its chat turn or ""). Pooled
        embeddings only: the paper's slot reads a *pair* of texts and has no position for one text.

        A device embeds its own texts this way and the server embeds public neutral human texts the same
        way; their difference is the user's drift. Why not the base model's texts in place of the user's
        (a paired difference, as for pLLMs): a pair shares its prompt or prefix, so the difference cancels
        the topic and register a user's texts share with their own prompts, which a pLLM's drift on
        generic probe prompts keeps; on human-written corpora that mismatch decided selection
        (benchmarks/selection_harness.py)."""
        if not self.pooled:
            raise ValueError("the slot embedding compares two texts; embed() needs a pooled embedding")
        if not texts or any(not (t or "").strip() for t in texts):
            raise ValueError("need at least one text, and no empty text, to embed")
        vector = self._mean(self._pooled(self._contexts(contexts, len(texts)), texts))
        if not np.isfinite(vector).all():
            raise ValueError("text embedding is not finite")
        return vector.astype(np.float32)

    def candidate_words(self, probs: np.ndarray) -> tuple[list[str], list[float]]:
        """Top next-token words at the adjective slot (paper §4.2), merged over case, descending."""
        ids, words = self._word_vocab
        order = np.argsort(-probs[ids])
        seen: dict[str, float] = {}
        for i in order:
            w = words[i]
            seen[w] = seen.get(w, 0.0) + float(probs[ids[i]])
            if len(seen) >= self.config.n_candidates:
                break
        ranked = sorted(seen.items(), key=lambda kv: -kv[1])
        return [w for w, _ in ranked], [p for _, p in ranked]

    def subvector(self, word: str) -> np.ndarray:
        """Sub-vector of a word by the direct route (paper §4.3), calibrated like drift embeddings:
        the mean vector of common style adjectives (the shared component) is subtracted."""
        if self._word_center is None:
            self._word_center = self.word_vectors(REFERENCE_WORDS).mean(0)
        if word not in self._subvectors:
            self._subvectors[word] = (self.word_vectors([word])[0] - self._word_center).astype(np.float32)
        return self._subvectors[word]

    def word_vectors(self, words: Sequence[str], progress: bool = False) -> np.ndarray:
        """Direct-route vectors in this embedding's space: the slot of ``WORD_PROMPT``, or the pool of
        ``WORD_TEXT`` (a pooled drift is no slot state, so the slot's word vector would not compare)."""
        slot = not self.pooled
        texts = [self._chat(WORD_PROMPT.format(word=w)) if slot else WORD_TEXT.format(word=w) for w in words]
        out = []
        for i in tqdm(range(0, len(texts), 64), disable=not progress, desc="words", leave=False):
            chunk = texts[i : i + 64]
            out.append(self._final_states(chunk)[0] if slot else self._pooled([""] * len(chunk), chunk))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def _calibration_texts(tokenizer, n: int) -> tuple[list[str], list[str]]:
    """A fixed sample of ``n`` neutral answers of the built-in corpus and their rendered chat turns."""
    samples = sorted(load_corpus("builtin").neutral, key=lambda s: (s.prompt, s.response))
    random.Random(0).shuffle(samples)
    if n > len(samples):
        raise ValueError(f"calibration_texts={n}: the built-in corpus has {len(samples)} neutral texts")
    chosen = samples[:n]
    return [chat_prompt(tokenizer, s.prompt) for s in chosen], [s.response for s in chosen]


def _word_vocabulary(tokenizer) -> tuple[np.ndarray, list[str]]:
    """Token ids that decode to a whole word (leading space + letters), with the lower-cased word."""
    ids, words = [], []
    for token, idx in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([token])
        if text.startswith(" ") and re.fullmatch(r"[A-Za-z]{3,}", text[1:]):
            word = text[1:].lower()
            if word not in _STOP:
                ids.append(idx)
                words.append(word)
    return np.array(ids), words
