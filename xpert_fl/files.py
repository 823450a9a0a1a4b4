"""Atomic writes: a file or directory is written under a temporary name beside its target, then renamed
over it, so a reader (or a crashed writer's next run) sees the old version or the whole new one, never a
partial write.

The temporary name is unique (``.<name>.<random>.tmp``), so concurrent writers of one target never
write into one temporary file, and it is created like a plain ``open``/``mkdir`` would create it (the
process umask decides its permissions), so the rename is the only difference from writing in place. On
an error the temporary file or directory is removed and the target is left as it was. (Named ``files``,
not ``io``: a script run from this folder would otherwise shadow the standard ``io`` module.)
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_file(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a new empty temporary file beside ``path`` to write (by name: safetensors, tar, ...); on
    success rename it over ``path``. ``fsync`` flushes it to disk first, for state a crash must not lose."""
    path = Path(path)
    tmp = _temp_sibling(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # O_EXCL: the name is ours alone
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_dir(directory: str | Path) -> Iterator[Path]:
    """Yield a new empty temporary directory beside ``directory`` to fill; on success it replaces
    ``directory`` (an existing one is removed first: ``os.replace`` cannot overwrite a non-empty one)."""
    directory = Path(directory)
    tmp = _temp_sibling(directory)
    tmp.mkdir()
    try:
        yield tmp
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
