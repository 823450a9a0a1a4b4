"""Sub-vectors of candidate words by two routes (paper §4.2, §4.3) and prompt tuning between them.

Route (a), *stylized texts* (§4.2): the summarizer's own model answers the probe prompts in the style
of the word ("... Answer in a formal style."); the drift of those answers from the base answers is
embedded exactly like a pLLM's drift (``Summarizer.drift``: adjective slot, null-drift calibration),
so the vector lives in the same space as the drifts it will decompose. Faithful, but it costs
``len(prompts)`` generations plus as many summarizer forwards per word.

Route (b), *direct* (§4.3): one forward of the prompt ``[prefix] <word> [suffix]`` inside the
summarizer's chat template + answer prefix, read at the last position, minus a centring vector (the
mean over ``REFERENCE_WORDS`` of the same prompt) — ``Summarizer.subvector``. ``PromptTuner`` makes
prefix and suffix trainable soft tokens (initialised from the embeddings of the hand-crafted text) and
fits them with Adam so that route (b) matches route (a) on (word, route-a vector) pairs; the model
weights stay frozen (gradients are taken with respect to the soft tokens only, nothing is written to
the model). With the default text (the summarizer's own ``WORD_PROMPT`` split at the word) an
untrained tuner reproduces ``Summarizer.word_vectors`` / ``Summarizer.subvector``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from xpert_fl.chat import chat_prompt
from xpert_fl.explain import ProbeConfig
from xpert_fl.files import atomic_file
from xpert_fl.probe import generate, nonempty
from xpert_fl.summarizer import REFERENCE_WORDS, WORD_PROMPT, Summarizer

STYLE_INSTRUCTION = "{prompt}\n\nAnswer in {article} {word} style."
_SENTINEL = "\u0000XPERT-WORD\u0000"
Pairs = Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]


# --- route (a): stylized texts ---------------------------------------------------------------------
def style_prompt(prompt: str, word: str, instruction: str = STYLE_INSTRUCTION) -> str:
    """The user turn asking for an answer to ``prompt`` in the style ``word``."""
    article = "an" if word[:1].lower() in "aeiou" else "a"
    return instruction.format(prompt=prompt, word=word, article=article)


def stylized_answers(
    summarizer: Summarizer,
    words: Sequence[str],
    prompts: Sequence[str],
    probe: ProbeConfig,
    instruction: str = STYLE_INSTRUCTION,
    progress: bool = False,
) -> list[list[str]]:
    """Greedy answers of the summarizer's model to every prompt in every word's style, [word][prompt].

    All ``len(words) * len(prompts)`` generations go through one batched ``generate`` call."""
    words = [_check_word(w) for w in words]
    if not prompts:
        raise ValueError("at least one probe prompt is needed for the stylized-text route")
    texts = [style_prompt(p, w, instruction) for w in words for p in prompts]
    loaded = summarizer.loaded
    out = generate(loaded.model, loaded.tokenizer, texts, probe.max_new_tokens, probe.batch_size, progress=progress)
    n = len(prompts)
    return [nonempty(out[i * n : (i + 1) * n]) for i in range(len(words))]


def stylized_vectors(
    words: Sequence[str],
    summarizer: Summarizer,
    prompts: Sequence[str],
    base_answers: Sequence[str],
    probe: ProbeConfig,
    instruction: str = STYLE_INSTRUCTION,
    progress: bool = False,
) -> np.ndarray:
    """Route-(a) sub-vectors, one row per word: drift of the word-styled answers from ``base_answers``
    (the base model's answers to the same ``prompts``), calibrated like every pLLM drift."""
    words = list(words)
    if not words:
        raise ValueError("words is empty: at least one word is needed")
    if len(base_answers) != len(prompts):
        raise ValueError(f"need one base answer per prompt, got {len(base_answers)} for {len(prompts)} prompts")
    styled = stylized_answers(summarizer, words, prompts, probe, instruction, progress)
    # both answer the plain prompt: the style instruction is not part of the context they are read in
    contexts = [chat_prompt(summarizer.tokenizer, p) for p in prompts]
    rows = [summarizer.drift(list(base_answers), answers, contexts).vector for answers in styled]
    return np.stack(rows).astype(np.float32)


# --- errors ----------------------------------------------------------------------------------------
def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise 1 - cos(a, b) (1-D inputs give a scalar array)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return 1.0 - num / np.maximum(den, 1e-12)


def route_error(route_b: Callable[[str], np.ndarray], pairs: Pairs) -> float:
    """Mean cosine distance of ``route_b(word)`` from the route-(a) vector over (word, vector) pairs."""
    words, targets = _pairs(pairs, None)
    return float(np.mean([cosine_distance(route_b(w), t) for w, t in zip(words, targets, strict=True)]))


# --- route (b) with prompt tuning ------------------------------------------------------------------
class PromptTuner:
    """Trainable soft prefix/suffix around a word in the summarizer's prompt (paper §4.3, Fig. 9).

    Input sequence, as embeddings: chat template up to the user content, ``n_prefix`` soft tokens, the
    word's token embeddings, ``n_suffix`` soft tokens, the rest of the template and the answer prefix.
    The raw output is the final hidden state (post final norm) at the last position; ``vector(word)``
    subtracts the mean raw output over ``reference_words`` computed with the same (tuned) prompt, which
    is how ``Summarizer.subvector`` centres the untuned direct route.

    ``prefix_text``/``suffix_text`` default to the summarizer's ``WORD_PROMPT`` split at the word, so
    an untrained tuner reproduces ``Summarizer.word_vectors``. ``n_prefix``/``n_suffix`` default to the
    number of tokens of those texts; fewer keeps the tokens nearest the word, more repeats the text
    outward (the prefix cycles leftwards, the suffix rightwards) so the rows still start from real
    token embeddings.

    ``learn_offset``: also train a free vector added after centring (initialised to zero, so the
    untrained identity holds). Route-(a) vectors of different words share a large common component
    (the drift any style instruction causes) that the reference-mean centring removes by construction
    (the centred vectors of the reference words sum to zero); the offset can carry it.
    """

    def __init__(
        self,
        summarizer: Summarizer,
        n_prefix: int | None = None,
        n_suffix: int | None = None,
        prefix_text: str | None = None,
        suffix_text: str | None = None,
        reference_words: Sequence[str] = REFERENCE_WORDS,
        batch_size: int = 32,
        learn_offset: bool = False,
    ):
        if summarizer.config.embedding != "slot":
            raise ValueError(
                f"prompt tuning fits the direct route of the adjective slot; this summarizer embeds with "
                f"{summarizer.config.embedding!r}: use SummarizerConfig(embedding='slot')"
            )
        self.summarizer = summarizer
        self.tokenizer = summarizer.tokenizer
        self.model = summarizer.model
        if prefix_text is None or suffix_text is None:
            template = getattr(summarizer.config, "word_prompt", WORD_PROMPT)
            default_prefix, default_suffix = template.split("{word}")
            prefix_text = default_prefix if prefix_text is None else prefix_text
            suffix_text = default_suffix if suffix_text is None else suffix_text
        self.prefix_text, self.suffix_text = prefix_text, suffix_text
        self.reference_words = [_check_word(w) for w in reference_words]
        if not self.reference_words:
            raise ValueError("reference_words is empty: the centring vector needs at least one word")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        head, tail = summarizer._chat(_SENTINEL).split(_SENTINEL)
        self.template = (head, tail)
        self._head_ids = self._ids(head)
        self._tail_ids = self._ids(tail)
        pre_ids, suf_ids = self._ids(prefix_text), self._ids(suffix_text)
        n_prefix = len(pre_ids) if n_prefix is None else n_prefix
        n_suffix = len(suf_ids) if n_suffix is None else n_suffix
        if n_prefix < 0 or n_suffix < 0 or n_prefix + n_suffix == 0:
            raise ValueError(f"need n_prefix, n_suffix >= 0 and at least one soft token, got {n_prefix}, {n_suffix}")
        if (n_prefix and not pre_ids) or (n_suffix and not suf_ids):
            raise ValueError("soft tokens are initialised from text: give a non-empty prefix/suffix text")
        pre_ids = [pre_ids[(i - n_prefix) % len(pre_ids)] for i in range(n_prefix)]  # last n, cycled leftwards
        suf_ids = [suf_ids[i % len(suf_ids)] for i in range(n_suffix)]  # first n, cycled rightwards
        with torch.no_grad():
            self.prefix = torch.nn.Parameter(self._embed(pre_ids).clone().float())
            self.suffix = torch.nn.Parameter(self._embed(suf_ids).clone().float())
        self.offset = torch.nn.Parameter(torch.zeros(self.dim)) if learn_offset else None
        self.steps_trained = 0
        self._center_memo: tuple[tuple[int, ...], torch.Tensor] | None = None

    # --- shapes and identity ------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.summarizer.dim

    @property
    def n_prefix(self) -> int:
        return int(self.prefix.shape[0])

    @property
    def n_suffix(self) -> int:
        return int(self.suffix.shape[0])

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.prefix, self.suffix] + ([self.offset] if self.offset is not None else [])

    # --- forward ------------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _embed(self, ids: Sequence[int]) -> torch.Tensor:
        table = self.model.get_input_embeddings()
        return table(torch.tensor(list(ids), dtype=torch.long, device=table.weight.device)).detach()

    def _raw(self, words: Sequence[str]) -> torch.Tensor:
        """Last-position final hidden states for ``words``; differentiable in prefix/suffix only."""
        outs = []
        for start in range(0, len(words), self.batch_size):
            outs.append(self._raw_batch(words[start : start + self.batch_size]))
        return torch.cat(outs)

    def _raw_batch(self, words: Sequence[str]) -> torch.Tensor:
        head, tail = self._embed(self._head_ids), self._embed(self._tail_ids)
        dtype = head.dtype
        prefix, suffix = self.prefix.to(dtype), self.suffix.to(dtype)
        seqs = [torch.cat([head, prefix, self._embed(self._ids(w)), suffix, tail]) for w in words]
        width = max(s.shape[0] for s in seqs)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        pad = self._embed([pad_id])
        rows, masks = [], []
        for s in seqs:  # left padding, as Summarizer._final_states
            n_pad = width - s.shape[0]
            rows.append(torch.cat([pad.expand(n_pad, -1), s]))
            masks.append(torch.cat([torch.zeros(n_pad, dtype=torch.long), torch.ones(s.shape[0], dtype=torch.long)]))
        embeds = torch.stack(rows)
        mask = torch.stack(masks).to(embeds.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids)
        return out.last_hidden_state[:, -1, :].float()

    def _train_vectors(self, words: Sequence[str], center_grad: bool) -> torch.Tensor:
        """Centred vectors with the centre recomputed from the current prompt (one forward)."""
        n = len(words)
        if center_grad:
            raw = self._raw(list(words) + self.reference_words)
            v = raw[:n] - raw[n:].mean(0)
        else:
            with torch.no_grad():
                center = self._raw(self.reference_words).mean(0)
            v = self._raw(list(words)) - center
        return v if self.offset is None else v + self.offset

    def _center(self) -> torch.Tensor:
        # Memoised per prompt state: in-place updates (Adam, add_) bump the parameters' _version.
        key = (id(self.prefix), self.prefix._version, id(self.suffix), self.suffix._version)
        if self._center_memo is None or self._center_memo[0] != key:
            with torch.no_grad():
                self._center_memo = (key, self._raw(self.reference_words).mean(0))
        return self._center_memo[1]

    @torch.no_grad()
    def raw_vectors(self, words: Sequence[str]) -> np.ndarray:
        """Uncentred outputs; equal to ``Summarizer.word_vectors(words)`` for an untrained default tuner."""
        words = [_check_word(w) for w in words]
        if not words:
            raise ValueError("words is empty: at least one word is needed")
        return self._raw(words).numpy()

    def center(self) -> np.ndarray:
        """The centring vector: mean raw output over the reference words with the current prompt."""
        return self._center().numpy().copy()

    @torch.no_grad()
    def vectors(self, words: Sequence[str]) -> np.ndarray:
        """Tuned direct-route sub-vectors (centred), one row per word; one forward per word once the
        centre of the current prompt is known."""
        words = [_check_word(w) for w in words]
        if not words:
            raise ValueError("words is empty: at least one word is needed")
        v = self._raw(words) - self._center()
        if self.offset is not None:
            v = v + self.offset
        return v.numpy().astype(np.float32)

    def vector(self, word: str) -> np.ndarray:
        """Tuned direct-route sub-vector of one word; a drop-in for ``Summarizer.subvector``."""
        return self.vectors([word])[0]

    __call__ = vector

    # --- training -----------------------------------------------------------------------------------
    def _loss(self, words: Sequence[str], targets: torch.Tensor, center_grad: bool) -> torch.Tensor:
        v = self._train_vectors(words, center_grad)
        return (1.0 - torch.nn.functional.cosine_similarity(v, targets, dim=-1)).mean()

    def fit(
        self,
        pairs: Pairs,
        steps: int = 30,
        lr: float = 1e-2,
        seed: int = 0,
        batch_size: int | None = None,
        center_grad: bool = True,
        offset_lr: float | None = None,
        progress: bool = False,
    ) -> list[float]:
        """Adam on mean(1 - cos(v_b(word), v_a(word))) over (word, route-a vector) pairs.

        ``batch_size`` pairs per step (None: all pairs, deterministic); ``seed`` orders mini-batches.
        ``center_grad``: the centring vector is recomputed with the current prompt at every step and
        differentiated through (exact objective); False treats it as a constant per step (cheaper).
        ``offset_lr``: learning rate of the offset (``learn_offset``), default ``10 * lr``: it starts at
        zero and must grow to the scale of the centred states, while the soft tokens start in place.
        Returns the training loss of each step's batch, measured before that step's update."""
        words, targets = _pairs(pairs, self.dim)
        if steps < 1 or not lr > 0:
            raise ValueError(f"steps >= 1 and lr > 0 are required, got {steps}, {lr}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        target = torch.from_numpy(targets).float()
        bs = len(words) if batch_size is None else min(batch_size, len(words))
        rng = random.Random(seed)
        order: list[int] = []
        params = self.parameters()
        groups = [{"params": [self.prefix, self.suffix], "lr": lr}]
        if self.offset is not None:
            groups.append({"params": [self.offset], "lr": 10 * lr if offset_lr is None else offset_lr})
        opt = torch.optim.Adam(groups)
        history = []
        for _ in tqdm(range(steps), desc="prompt tuning", disable=not progress, leave=False):
            if len(order) < bs:
                perm = list(range(len(words)))
                if bs < len(words):
                    rng.shuffle(perm)
                order += perm
            idx, order = order[:bs], order[bs:]
            with torch.enable_grad():
                loss = self._loss([words[i] for i in idx], target[idx], center_grad)
                if not torch.isfinite(loss):  # stop before a bad step can reach the soft tokens
                    raise FloatingPointError(f"prompt-tuning loss is {float(loss)} at step {self.steps_trained + 1}")
                # Gradients w.r.t. the soft tokens only: no weight gradient is computed or stored.
                grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append(float(loss.detach()))
            self.steps_trained += 1
        return history

    @torch.no_grad()
    def error(self, pairs: Pairs) -> float:
        """Mean cosine distance of the tuned route (b) from route (a) over (word, vector) pairs."""
        words, targets = _pairs(pairs, self.dim)
        return float(cosine_distance(self.vectors(words), targets).mean())

    # --- persistence --------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        return {
            "format": "xpert-prompt-tuner/1",
            "summarizer": self.summarizer.fingerprint,
            "template_sha": _sha(json.dumps(self.template)),
            "prefix_text": self.prefix_text,
            "suffix_text": self.suffix_text,
            "reference_words": json.dumps(self.reference_words),
            "steps_trained": str(self.steps_trained),
        }

    def save(self, path: str | Path) -> Path:
        """Soft tokens + metadata as safetensors, written atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"prefix": self.prefix.detach().contiguous(), "suffix": self.suffix.detach().contiguous()}
        if self.offset is not None:
            tensors["offset"] = self.offset.detach().contiguous()
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=self._metadata())
        return path

    @classmethod
    def load(cls, path: str | Path, summarizer: Summarizer, batch_size: int = 32) -> PromptTuner:
        """A tuner saved by ``save``; refuses one trained for another summarizer or chat template."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no prompt-tuner file at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "xpert-prompt-tuner/1":
            raise ValueError(f"{path} is not a prompt-tuner file (format {meta.get('format')!r})")
        if meta["summarizer"] != summarizer.fingerprint:
            raise ValueError(
                f"{path} was tuned for summarizer {meta['summarizer']}, not {summarizer.fingerprint}: "
                "its soft tokens would not match this embedding space"
            )
        tensors = load_file(str(path))
        tuner = cls(
            summarizer,
            n_prefix=int(tensors["prefix"].shape[0]) if tensors["prefix"].ndim == 2 else None,
            n_suffix=int(tensors["suffix"].shape[0]) if tensors["suffix"].ndim == 2 else None,
            prefix_text=meta["prefix_text"],
            suffix_text=meta["suffix_text"],
            reference_words=json.loads(meta["reference_words"]),
            batch_size=batch_size,
            learn_offset="offset" in tensors,
        )
        if meta["template_sha"] != _sha(json.dumps(tuner.template)):
            raise ValueError(f"{path} was tuned with another chat template / answer prefix than this summarizer's")
        for name in ("prefix", "suffix"):
            t = tensors[name]
            if t.ndim != 2 or t.shape[1] != tuner.dim:
                raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, expected (n, {tuner.dim})")
        tuner.prefix = torch.nn.Parameter(tensors["prefix"].float())
        tuner.suffix = torch.nn.Parameter(tensors["suffix"].float())
        if "offset" in tensors:
            if tuple(tensors["offset"].shape) != (tuner.dim,):
                raise ValueError(f"{path}: offset has shape {tuple(tensors['offset'].shape)}, expected ({tuner.dim},)")
            tuner.offset = torch.nn.Parameter(tensors["offset"].float())
        tuner.steps_trained = int(meta.get("steps_trained", "0"))
        return tuner


# --- validation ------------------------------------------------------------------------------------
def _check_word(word: object) -> str:
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"a word must be a non-empty string, got {word!r}")
    return word.strip()


def _pairs(pairs: Pairs, dim: int | None) -> tuple[list[str], np.ndarray]:
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    if not items:
        raise ValueError("pairs is empty: at least one (word, route-a vector) pair is needed")
    words, rows = [], []
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ValueError(f"each pair must be (word, vector), got {item!r:.80}")
        word, vec = item
        words.append(_check_word(word))
        v = np.asarray(vec, dtype=np.float64)
        if v.ndim != 1 or (dim is not None and v.shape[0] != dim):
            want = f"({dim},)" if dim is not None else "1-D"
            raise ValueError(f"target vector of {word!r} has shape {v.shape}, expected {want}")
        if not np.isfinite(v).all():
            raise ValueError(f"target vector of {word!r} is not finite (NaN or inf)")
        if not np.linalg.norm(v) > 0:
            raise ValueError(f"target vector of {word!r} is zero: its cosine is undefined")
        rows.append(v)
    if dim is None and len({r.shape[0] for r in rows}) > 1:
        raise ValueError("target vectors have different dimensions")
    return words, np.stack(rows).astype(np.float32)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
