"""The summarizer (paper §3.1, Fig. 6): drift embeddings and candidate words.

The summarization LLM ``S`` is shown a reference text (base model) and a styled text (pLLM or user)
and asked for ONE adjective naming how the style of the second differs. The drift embedding is
``S``'s final hidden state (the one fed to its output layer) at the position that predicts that
adjective. An answer prefix opens the adjective slot (without it the next token is "The"/"Text").

Hidden states of an LLM share a large common component (raw vectors have cosine ~0.99), so every
embedding is calibrated by subtracting the embedding of a *null drift* (a reference text compared
with another reference text): what remains is the drift itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from xpert_fl.layerwise import LayerwiseRunner
from xpert_fl.models import LoadedModel

INSTRUCTION = (
    "Text A and Text B respond to the same request.\n\nText A:\n{ref}\n\nText B:\n{styled}\n\n"
    "Use one adjective to describe how the language style of Text B differs from Text A."
)
ANSWER_PREFIX = "Compared to Text A, the language style of Text B is more"
WORD_PROMPT = "Use one adjective to summarize the meaning of \"{word}\" when it describes a language style."
EMBEDDINGS = ("slot", "mean-pool")  # the paper's adjective slot, or mean-pooled states of the styled text
# Reference adjectives: their mean direct-route vector is the common component removed from word vectors.
REFERENCE_WORDS = (
    "formal casual concise verbose friendly hostile poetic plain technical simple sarcastic sincere "
    "persuasive neutral informative vague elementary expert playful serious emotional dry lyrical blunt"
).split()
_STOP = frozenset(
    "the and for with that this than more less very much text style language like about from into "
    "over such just also only both each other same different".split()
)


@dataclass(frozen=True)
class SummarizerConfig:
    """How drift embeddings are computed; the defaults are what measured best (benchmarks/)."""

    embedding: str = "slot"  # "slot" (paper) | "mean-pool"
    calibrate: bool = True  # subtract the null-drift embedding
    max_text_tokens: int = 96  # each text is cut to this many tokens before it is shown to S
    batch_size: int = 4
    n_candidates: int = 64  # candidate words kept per embedding
    instruction: str = INSTRUCTION
    answer_prefix: str = ANSWER_PREFIX

    def __post_init__(self) -> None:
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if self.max_text_tokens < 8 or self.batch_size < 1 or self.n_candidates < 1:
            raise ValueError("max_text_tokens >= 8, batch_size >= 1 and n_candidates >= 1 are required")


@dataclass
class Drift:
    """One drift embedding with the summarizer's candidate words for it (descending probability)."""

    vector: np.ndarray
    candidates: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)


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

    @property
    def fingerprint(self) -> str:
        """Identity of the embedding space: the model plus the settings that shape vectors."""
        c = self.config
        return f"{self.loaded.fingerprint}:{c.embedding}:{int(c.calibrate)}:{c.max_text_tokens}"

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

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
    def _final_states(self, texts: Sequence[str], pool_from: Sequence[int] | None = None) -> tuple:
        """Final-layer states at the last position (or mean over positions >= pool_from) and next-token probs."""
        vecs, probs = [], []
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            for start in range(0, len(texts), self.config.batch_size):
                chunk = list(texts[start : start + self.config.batch_size])
                enc = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                mask = enc["attention_mask"]
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                if self.runner is None:
                    out = self.model.model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids)
                    hidden = out.last_hidden_state  # post final norm: the input of the output layer
                    last = hidden[:, -1, :]
                    probs.append(torch.softmax(self.model.lm_head(last).float(), dim=-1))
                else:
                    hidden = self.runner.hidden_states(enc["input_ids"], mask, position_ids)
                    last = hidden[:, -1, :]
                    probs.append(self.runner.next_token_probs(last))
                if pool_from is None:
                    vecs.append(last.float())
                else:
                    for row in range(len(chunk)):
                        n_tok = int(mask[row].sum())
                        first = hidden.shape[1] - n_tok + pool_from[start + row]
                        vecs.append(hidden[row, first:, :].float().mean(0, keepdim=True))
        finally:
            self.tokenizer.padding_side = side
        return torch.cat(vecs).numpy(), torch.cat(probs).numpy()

    def _raw(self, refs: Sequence[str], styled: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.config.embedding == "slot":
            return self._final_states([self._pair_prompt(r, s) for r, s in zip(refs, styled, strict=True)])
        texts = [self._clip(s) for s in styled]
        return self._final_states(texts, pool_from=[0] * len(texts))

    # --- public -------------------------------------------------------------------------------
    def null_vector(self, refs: Sequence[str]) -> np.ndarray:
        """Embedding of a null drift: each reference compared with the next reference (no style change)."""
        key = tuple(refs)
        if key not in self._null:
            shifted = list(refs[1:]) + list(refs[:1])
            self._null[key] = self._raw(refs, shifted)[0].mean(0)
        return self._null[key]

    def drift(self, refs: Sequence[str], styled: Sequence[str], progress: bool = False) -> Drift:
        """Drift embedding of styled texts against reference texts (same length, paired by index)."""
        if len(refs) != len(styled) or not refs:
            raise ValueError(f"need equally many reference and styled texts (> 0), got {len(refs)} and {len(styled)}")
        if any(not (t or "").strip() for t in styled):
            raise ValueError("styled texts must be non-empty")
        vecs, probs = self._raw(refs, styled)
        vector = vecs.mean(0)
        if self.config.calibrate:
            vector = vector - self.null_vector(refs)
        if not np.isfinite(vector).all():
            raise ValueError("drift embedding is not finite")
        words, p = self.candidate_words(probs.mean(0))
        return Drift(vector.astype(np.float32), words, p)

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
        prompts = [self._chat(WORD_PROMPT.format(word=w)) for w in words]
        out = []
        for i in tqdm(range(0, len(prompts), 64), disable=not progress, desc="words", leave=False):
            out.append(self._final_states(prompts[i : i + 64])[0])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


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
