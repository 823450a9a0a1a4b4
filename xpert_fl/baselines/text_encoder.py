"""Text-encoder baseline (paper §2.2, §8): embed pLLMs' outputs and the user's texts, pick by cosine.

Server side, once per pLLM: its greedy answers to the probe prompts, each embedded with a sentence
encoder, averaged and normalised: one vector per pLLM. Device side: it downloads those vectors (not
the adapters), embeds its own texts the same way and picks the pLLM of highest cosine. The encoder
itself (90.9 MB) is a one-off install on the device, like XPerT's summarizer: not counted per
selection (``details["encoder_bytes"]`` says how large it is).

The encoder is :mod:`xpert_fl.encoder` (XPerT's own embedding space by default, so the two methods
differ in what they compare, not in how texts are read): the baseline compares a user's texts with
what each pLLM *writes*, XPerT with the data each pLLM was *trained on*, explained in the basis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xpert_fl.baselines.core import EMBEDDINGS, DeviceMeter, Selection, SelectionTask, single
from xpert_fl.data import load_corpus, split_roles
from xpert_fl.encoder import TextEncoder, default_encoder
from xpert_fl.explain import ProbeConfig, adapter_answers
from xpert_fl.probe import nonempty, probe_prompts

DEFAULT_PROBE_PROMPTS = 24  # the run config's num-probe-prompts default


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
        self.add_texts(entry_id, nonempty(answers))

    def select(self, task: SelectionTask) -> Selection:
        meter = DeviceMeter(self.name, task.sizes)
        ids = [e.id for e in task.entries()]
        if not ids:
            return meter.selection(single(None))
        for entry_id in ids:
            if entry_id not in self.vectors:
                self._probe(task, entry_id)
        matrix = np.stack([self.vectors[i] for i in ids])
        meter.receive(EMBEDDINGS, meter.sizes.embeddings(ids, matrix, self.encoder.fingerprint))
        with meter.device():
            cosines = matrix @ self.encoder.mean([s.response for s in task.samples])
        scores = dict(zip(ids, cosines.astype(float).tolist(), strict=True))
        best = ids[int(np.argmax(cosines))]  # ties: first in cache order
        return meter.selection(
            single(best), scores, encoder=self.encoder.fingerprint, encoder_bytes=self.encoder.weights_bytes
        )
