"""Build evaluation corpora of real human-written text that nobody on this project wrote.

Selection was tuned on the built-in corpus (text we generated); a default only means something when it
also holds on text from elsewhere. This script builds three corpora in the project's corpus format from
text shipped in Debian packages, reproducibly (fixed package versions' files, a fixed seed):

* ``debian-fortunes`` (prompt-less): the categories of the ``fortunes`` database (computers, politics,
  songs and poems, Zippy the Pinhead, ...), one style per category; ``neutral`` is the general
  ``cookie`` file. Categories differ in topic and in register, as the paper's real-world corpora do.
* ``debian-kjv-bible`` (prompt-less): verses of the King James Bible grouped by genre (law, narrative,
  psalms, wisdom, prophets, gospels, epistles, apocalyptic); ``neutral`` is the histories (Samuel, Kings).
* ``debian-dictionaries`` (prompt -> response): ``Define "<term>".`` answered by eight dictionaries
  (Webster 1913 via GCIDE, the Devil's Dictionary, the Jargon File, FOLDOC, V.E.R.A. acronyms and the
  FreeDict English-French/German/Spanish dictionaries); ``neutral`` is WordNet's plain glosses.

The text is not committed (each source has its own licence): run this script, it installs the
Debian packages it needs (as root, with apt-get) or names the missing package, and writes

    benchmarks/results/corpora/<name>/{neutral,<style>}.jsonl + SOURCES.json

Each corpus is written to a temporary directory and renamed into place, so an interrupted build
leaves nothing half-written.

    python benchmarks/real_corpora.py                 # both corpora
    python benchmarks/real_corpora.py --per-style 300 --corpora debian-fortunes
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from xpert_fl.files import atomic_dir

FORTUNES = Path("/usr/share/games/fortunes")
DICTD = Path("/usr/share/dictd")
OUT = Path(__file__).resolve().parent / "results" / "corpora"
MIN_CHARS, MAX_CHARS = 40, 600  # a text a user could have written in one go; longer ones are cut at a word


class SourceMissing(RuntimeError):
    """A Debian package with the source text is not installed and could not be installed."""


@dataclass(frozen=True)
class Source:
    """One style of a corpus: the Debian package that ships it and how to read its texts."""

    style: str
    package: str
    path: Path
    read: Callable[[Path], Iterator[tuple[str, str]]]  # -> (prompt, response)
    min_chars: int = MIN_CHARS  # bilingual entries are short by nature: a word and its translations


def _clean(text: str) -> str:
    text = re.sub(r"[{}]", "", text)  # dictd cross-reference braces
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS].rsplit(" ", 1)[0]
    return text


def fortunes(path: Path) -> Iterator[tuple[str, str]]:
    """One fortune per ``%``-separated record (prompt-less)."""
    for record in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
        yield "", _clean(record.strip("%\n"))


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def dictd(path: Path, drop_headword: bool = True) -> Iterator[tuple[str, str]]:
    """Entries of a dictd database (``.index`` + dictzip ``.dict.dz``) as ('Define "<term>".', text).

    The entry's first line is the headword (with a pronunciation, in FreeDict); it is dropped where it
    says nothing but that, so the response is the definition as the dictionary writes it."""
    data = gzip.open(path.with_suffix(".dict.dz")).read()
    seen: set[int] = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        start, size = _b64(parts[1]), _b64(parts[2])
        if start in seen:  # several headwords point at one entry (gcide, wn): keep it once
            continue
        seen.add(start)
        entry = data[start : start + size].decode("utf-8", errors="replace").strip()
        head, _, body = entry.partition("\n")
        if drop_headword and body.strip():
            entry = body
        term = head.split("/")[0].split(",")[0].split("\\")[0].strip()
        if term:
            yield f'Define "{term}".', _clean(entry)


BIBLE = Path("/usr/bin/bible")
KJV_GROUPS = {  # style -> books (the bible program's abbreviations), grouped by genre
    "neutral": ("1Sa", "2Sa", "1Ki", "2Ki"),  # the histories: plain narrative
    "law": ("Lev", "Num", "Deu"),
    "narrative": ("Gen", "Jos", "Jdg"),
    "psalms": ("Psa",),
    "wisdom": ("Pro", "Ecc"),
    "prophets": ("Isa", "Jer"),
    "gospels": ("Mat", "Mar", "Luk", "Joh"),
    "epistles": ("Rom", "1Co", "2Co", "Gal", "Eph", "Heb"),
    "apocalyptic": ("Rev", "Dan"),
}


def kjv(books: tuple[str, ...]) -> Callable[[Path], Iterator[tuple[str, str]]]:
    """Verses of the King James Version (bible-kjv's ``bible`` program), one prompt-less text each."""

    def read(program: Path) -> Iterator[tuple[str, str]]:
        for book in books:
            out = subprocess.run([str(program), "-f", f"{book}1:1-999:999"], capture_output=True, text=True,
                                 check=True).stdout
            for line in out.splitlines():
                _, _, verse = line.partition(" ")  # "Prv3:1 My son, ..."
                if verse:
                    yield "", _clean(verse)

    return read


def _dict(style: str, package: str, name: str, drop_headword: bool = True, min_chars: int = MIN_CHARS) -> Source:
    return Source(style, package, DICTD / f"{name}.index", lambda p: dictd(p, drop_headword), min_chars)


CORPORA: dict[str, dict[str, Source]] = {
    "debian-fortunes": {
        s.style: s
        for s in [
            Source("neutral", "fortunes", FORTUNES / "cookie", fortunes),
            *(Source(cat, "fortunes", FORTUNES / cat, fortunes)
              for cat in ("computers", "politics", "science", "songs-poems", "zippy", "men-women", "work",
                          "people")),
        ]
    },
    "debian-kjv-bible": {style: Source(style, "bible-kjv", BIBLE, kjv(books)) for style, books in KJV_GROUPS.items()},
    "debian-dictionaries": {
        s.style: s
        for s in [
            _dict("neutral", "dict-wn", "wn"),
            _dict("webster1913", "dict-gcide", "gcide", drop_headword=False),
            _dict("devils-dictionary", "dict-devil", "devil", drop_headword=False),
            _dict("jargon-file", "dict-jargon", "jargon"),
            _dict("foldoc", "dict-foldoc", "foldoc"),
            _dict("acronyms", "dict-vera", "vera"),
            _dict("french", "dict-freedict-eng-fra", "freedict-eng-fra", min_chars=20),
            _dict("german", "dict-freedict-eng-deu", "freedict-eng-deu", min_chars=20),
            _dict("spanish", "dict-freedict-eng-spa", "freedict-eng-spa", min_chars=20),
        ]
    },
}


def ensure_installed(sources: list[Source], install: bool) -> None:
    """Install the Debian packages whose files are missing (root + apt-get), or name them."""
    missing = sorted({s.package for s in sources if not s.path.is_file()})
    if not missing:
        return
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False, env=env)
    still = sorted({s.package for s in sources if not s.path.is_file()})
    if still:
        files = ", ".join(str(s.path) for s in sources if s.package in still)
        raise SourceMissing(
            f"missing Debian package(s) {' '.join(still)} (files {files}); install them with "
            f"`apt-get install {' '.join(still)}` (as root) and run this script again"
        )


def build(name: str, per_style: int, neutral: int, out: Path, seed: int = 0) -> Path:
    """Write corpus ``name`` to ``out/name`` (temp dir, then rename); returns its directory."""
    sources = CORPORA[name]
    target = out / name
    out.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp:
        manifest = {"corpus": name, "seed": seed, "max_chars": MAX_CHARS, "styles": {}}
        used_prompts: set[str] = set()
        for style, src in sorted(sources.items(), key=lambda kv: kv[0] != "neutral"):  # neutral first
            want = neutral if style == "neutral" else per_style
            texts = list(dict.fromkeys(t for t in src.read(src.path) if len(t[1]) >= src.min_chars))
            # a term defined by two dictionaries belongs to one of them only: prompts identify a sample's role
            texts = [t for t in texts if not t[0] or t[0] not in used_prompts]
            random.Random(f"{seed}:{name}:{style}").shuffle(texts)
            if len(texts) < want:
                raise SourceMissing(f"{src.path} ({src.package}): {len(texts)} usable texts, {want} wanted")
            chosen = texts[:want]
            used_prompts.update(p for p, _ in chosen if p)
            with open(tmp / f"{style}.jsonl", "w", encoding="utf-8") as f:
                for prompt, response in chosen:
                    f.write(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n")
            manifest["styles"][style] = {"package": src.package, "file": str(src.path), "samples": len(chosen),
                                         "available": len(texts), "min_chars": src.min_chars}
        (tmp / "SOURCES.json").write_text(json.dumps(manifest, indent=2))
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", nargs="*", default=list(CORPORA), choices=list(CORPORA))
    ap.add_argument("--per-style", type=int, default=400, help="samples per style")
    ap.add_argument("--neutral", type=int, default=400, help="neutral samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-install", action="store_true", help="only name missing packages, never install")
    args = ap.parse_args(argv)
    try:
        ensure_installed([s for c in args.corpora for s in CORPORA[c].values()], install=not args.no_install)
        for name in args.corpora:
            path = build(name, args.per_style, args.neutral, args.out, args.seed)
            counts = json.loads((path / "SOURCES.json").read_text())["styles"]
            print(f"{path}: " + ", ".join(f"{s} {c['samples']}" for s, c in counts.items()))
    except SourceMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
