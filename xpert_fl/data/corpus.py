"""Style corpora: the on-disk format users supply, its validator, and the built-in corpora.

Format (a directory): one ``<style>.jsonl`` per style plus ``neutral.jsonl`` with unstyled text.
Each line is ``{"prompt": str, "response": str}``; ``prompt`` may be empty for plain text (poems,
tweets). For instruction data, ``neutral.jsonl`` holds plain default answers to the same prompts, so
that a similarity-s mixture can replace styled answers by neutral ones without changing the prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from xpert_fl.files import atomic_write_text

NEUTRAL = "neutral"
BUILTIN = {
    "builtin": "instructions",  # default: instruction -> response in 8 styles
    "builtin-levels": "levels",  # one dimension (expertise) at 4 ordered levels, paper §7.5
    "builtin-plain": "plain",  # prompt-less plain text in 4 styles
}


class CorpusError(ValueError):
    """A corpus directory does not follow the format; the message names the file and line."""


@dataclass(frozen=True)
class Sample:
    prompt: str
    response: str

    @property
    def has_prompt(self) -> bool:
        return bool(self.prompt)


@dataclass
class StyleCorpus:
    """Samples per style, plus the neutral reference samples."""

    name: str
    styles: dict[str, list[Sample]]
    neutral: list[Sample]
    levels: list[str] = field(default_factory=list)  # ordered styles, when the corpus is a levels set


def read_samples(path: str | Path) -> list[Sample]:
    """Samples of one JSONL file of the corpus format (a user's own data, one style file)."""
    path = Path(path)
    samples = []
    with open(path, "rb") as f:  # decoded line by line, so that an encoding error names its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CorpusError(f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start})") from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise CorpusError(f"{path}:{lineno}: expected an object with 'prompt' and 'response'")
            prompt, response = row.get("prompt", ""), row.get("response")
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise CorpusError(f"{path}:{lineno}: 'prompt' must be a string and 'response' a string")
            if not response.strip():
                raise CorpusError(f"{path}:{lineno}: empty 'response'")
            samples.append(Sample(prompt.strip(), response.strip()))
    return samples


def load_corpus(source: str | Path = "builtin") -> StyleCorpus:
    """Load and validate a corpus directory, or a built-in corpus by name (see ``BUILTIN``)."""
    if str(source) in BUILTIN:
        directory = Path(str(resources.files("xpert_fl.data") / "builtin" / BUILTIN[str(source)]))
        name = str(source)
    else:
        directory = Path(source).expanduser()
        name = directory.name
    if not directory.is_dir():
        known = ", ".join(BUILTIN)
        raise CorpusError(f"corpus {str(source)!r} is neither a directory nor a built-in corpus ({known})")
    files = sorted(p for p in directory.iterdir() if p.suffix == ".jsonl")
    by_style: dict[str, Path] = {}
    for path in files:
        style = path.stem.strip().lower()
        if style in by_style:
            raise CorpusError(f"duplicate style name {style!r}: {by_style[style].name} and {path.name}")
        by_style[style] = path
    if NEUTRAL not in by_style:
        raise CorpusError(f"corpus {directory} has no {NEUTRAL}.jsonl (unstyled reference text is required)")
    neutral = read_samples(by_style.pop(NEUTRAL))
    if not neutral:
        raise CorpusError(f"{directory / (NEUTRAL + '.jsonl')}: no samples")
    if not by_style:
        raise CorpusError(f"corpus {directory} has no style files besides {NEUTRAL}.jsonl")
    styles = {}
    for style, path in by_style.items():
        samples = read_samples(path)
        if not samples:
            raise CorpusError(f"{path}: style {style!r} has no samples")
        styles[style] = samples
    levels_file = directory / "levels.json"
    levels = read_levels(levels_file) if levels_file.is_file() else []
    unknown = set(levels) - set(styles)
    if unknown:
        raise CorpusError(f"{levels_file}: levels {sorted(unknown)} have no style file")
    return StyleCorpus(name=name, styles=styles, neutral=neutral, levels=levels)


def read_levels(path: Path) -> list[str]:
    """The ordered style names of a ``levels.json``: a JSON list of distinct strings; anything else is a
    CorpusError naming the file (and the line of a JSON error), not a traceback from further on."""
    try:
        levels = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise CorpusError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
    if not isinstance(levels, list) or not all(isinstance(x, str) for x in levels) or len(set(levels)) != len(levels):
        raise CorpusError(f"{path}: expected a JSON list of distinct style names, got {json.dumps(levels)[:80]}")
    return levels


def corpus_stats(corpus: StyleCorpus) -> dict[str, dict[str, float]]:
    """Samples and words per style (including neutral), for `xpert corpus show` and the README."""
    stats = {}
    for style, samples in {**corpus.styles, NEUTRAL: corpus.neutral}.items():
        words = [len(s.response.split()) for s in samples]
        stats[style] = {
            "samples": len(samples),
            "words": sum(words),
            "min_words": min(words),
            "max_words": max(words),
            "with_prompt": sum(s.has_prompt for s in samples),
        }
    return stats


def write_corpus(corpus: StyleCorpus, directory: str | Path) -> None:
    """Save a StyleCorpus in the on-disk format (each file written to a temp name, then renamed)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for style, samples in {**corpus.styles, NEUTRAL: corpus.neutral}.items():
        lines = (json.dumps({"prompt": s.prompt, "response": s.response}, ensure_ascii=False) + "\n" for s in samples)
        atomic_write_text(out / f"{style}.jsonl", "".join(lines))
    if corpus.levels:
        (out / "levels.json").write_text(json.dumps(corpus.levels))
