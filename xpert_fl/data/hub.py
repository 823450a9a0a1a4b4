"""The paper's public datasets through `datasets` (paper §7): usable when a hub is reachable.

Each source is turned into our corpus format (``StyleCorpus``) so every downstream tool treats it like
the built-in corpus. Without network (or with ``HF_HUB_OFFLINE=1`` and no local copy) loading fails
with a ``HubUnavailableError`` that names the dataset and the offline alternative.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from xpert_fl.data.corpus import NEUTRAL, Sample, StyleCorpus


class HubUnavailableError(RuntimeError):
    """A hub dataset could not be loaded (no network, no local HF cache, or unknown id)."""


@dataclass(frozen=True)
class HubSource:
    """Where one dataset lives on the hub and which columns hold the text and (optionally) the style."""

    dataset_id: str
    text_field: str
    split: str = "train"
    config: str | None = None
    style_field: str | None = None  # column naming the style; None: the whole set is one style
    style: str | None = None  # the style name when style_field is None
    prompt_field: str | None = None


# Column names follow the datasets' cards; they are checked when loaded (a missing column is an error).
SOURCES: dict[str, HubSource] = {
    "alpaca": HubSource("tatsu-lab/alpaca", text_field="output", prompt_field="instruction", style=NEUTRAL),
    "cds": HubSource("billray110/corpus-of-diverse-styles", text_field="text", style_field="label"),
    "gutenberg": HubSource(
        "sam-paech/gutenberg3-generalfiction-scifi-fantasy-romance-adventure-dpo",
        text_field="chosen",
        style_field="genre",
    ),
    "arxiv": HubSource("armanc/scientific_papers", config="arxiv", text_field="abstract", style="academic"),
    "pubmed": HubSource("armanc/scientific_papers", config="pubmed", text_field="abstract", style="academic"),
}


def load_hub_rows(source: HubSource, limit: int) -> list[dict]:
    """The first ``limit`` rows of a hub dataset (streamed, so nothing large is downloaded)."""
    try:
        import datasets

        stream = datasets.load_dataset(source.dataset_id, source.config, split=source.split, streaming=True)
        rows = []
        for row in stream:
            rows.append(row)
            if len(rows) >= limit:
                break
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, HfHubHTTPError...)
        raise HubUnavailableError(
            f"cannot load hub dataset {source.dataset_id!r}"
            f"{f' ({source.config})' if source.config else ''}: {err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}. This needs network access to the Hugging Face "
            f"hub or a local copy in the HF cache; offline, use the built-in corpus or a corpus directory."
        ) from err
    missing = {source.text_field, source.style_field, source.prompt_field} - {None} - set(rows[0] if rows else {})
    if missing:
        raise HubUnavailableError(f"hub dataset {source.dataset_id!r} has no column(s) {sorted(missing)}")
    return rows


def hub_corpus(names: list[str], per_style: int = 200, neutral_source: str = "alpaca") -> StyleCorpus:
    """A StyleCorpus from hub sources; ``neutral_source`` supplies the unstyled reference text."""
    unknown = [n for n in [*names, neutral_source] if n not in SOURCES]
    if unknown:
        raise KeyError(f"unknown hub source(s) {unknown}; known: {', '.join(SOURCES)}")
    styles: dict[str, list[Sample]] = defaultdict(list)
    for name in [*names, neutral_source]:
        source = SOURCES[name]
        for row in load_hub_rows(source, limit=per_style * (20 if source.style_field else 1)):
            style = str(row[source.style_field]) if source.style_field else source.style
            if name == neutral_source:
                style = NEUTRAL
            if len(styles[style]) < per_style and str(row[source.text_field]).strip():
                prompt = str(row[source.prompt_field]) if source.prompt_field else ""
                styles[style].append(Sample(prompt.strip(), str(row[source.text_field]).strip()))
    neutral = styles.pop(NEUTRAL, [])
    return StyleCorpus(name="hub:" + "+".join(names), styles=dict(styles), neutral=neutral)
