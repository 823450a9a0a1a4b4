"""PLLMCache: the server's store of pLLMs, a SQLite index plus one PEFT-format adapter per entry.

Layout of a cache directory::

    root/index.sqlite      tables ``meta`` (BaseInfo JSON, schema version) and ``entries`` (one row per pLLM)
    root/writer.lock       advisory lock that serialises writers across processes (Flower server + CLI)
    root/adapters/<id>/    adapter_config.json + adapter_model.safetensors, <id> = Adapter.content_hash
    root/tmp/              archives being imported are unpacked here (not in $TMPDIR, where a kill would leave them)
    root/tmp.lock          importers hold it shared while they unpack; an open that gets it exclusively clears tmp/

The index is the source of truth. ``add`` writes the adapter directory first (temp + rename) and commits
its row afterwards, ``remove`` deletes the row first and the directory afterwards, so a reader sees either
the old or the new state and never a half-written entry. A writer killed at any point leaves at worst an
unreferenced directory (orphan or ``.``-prefixed temp dir) or an unpacked archive in ``tmp/``, which the next
open removes. Connections are per call (WAL mode, busy timeout), so several processes may share one cache.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from peft import PeftModel

from xpert_fl.adapters import (
    CONFIG_FILE,
    MAX_ADAPTER_BYTES,
    MAX_CONFIG_BYTES,
    WEIGHTS_FILE,
    Adapter,
    AdapterError,
    _short,
    base_linear_shapes,
    validate_adapter,
)
from xpert_fl.files import atomic_file
from xpert_fl.models import LoadedModel

try:  # POSIX: cross-process writer lock. Elsewhere writers are serialised by SQLite only.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

SCHEMA_VERSION = 1
INDEX_FILE = "index.sqlite"
LOCK_FILE = "writer.lock"
ADAPTERS_DIR = "adapters"
TMP_DIR = "tmp"
TMP_LOCK_FILE = "tmp.lock"
ENTRY_FILE = "entry.json"
ARCHIVE_FORMAT = "xpert-fl/cache-entry/1"
MAX_RECORD_BYTES = 1 << 20  # entry.json in an archive: a few KB in practice
# metrics, label, basis words and explanation of one entry, each as stored (JSON / UTF-8): a few hundred
# bytes in practice; every listing of the cache reads them, so one upload must not make the index huge.
MAX_FIELD_BYTES = 64 * 2**10
LOCK_TIMEOUT_S = 60.0
BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    base_fingerprint TEXT NOT NULL,
    parents TEXT NOT NULL,
    created_at REAL NOT NULL,
    metrics TEXT NOT NULL,
    label TEXT,
    coords TEXT,
    words TEXT,
    explanation TEXT,
    size_bytes INTEGER NOT NULL
);
"""


class CacheError(RuntimeError):
    """The cache cannot do what was asked: missing or foreign cache, unknown id, bad archive or record."""


class UnknownEntryError(CacheError, KeyError):
    """No entry with this id (a KeyError too, so ``except KeyError`` works as for a mapping)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class BaseInfo:
    """What the cache needs of its base model to validate adapters without loading the model."""

    spec: str
    fingerprint: str
    shapes: dict[str, tuple[int, int]]

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> BaseInfo:
        """Describe a loaded base model; it must not be PEFT-wrapped (LoRA layers would count as linears)."""
        shapes = base_linear_shapes(loaded.model)
        if isinstance(loaded.model, PeftModel) or any(".lora_" in name for name in shapes):
            raise CacheError(
                f"model {loaded.spec!r} is wrapped with PEFT/LoRA layers; build BaseInfo from the plain base "
                "model, before get_peft_model (which modifies the model in place)"
            )
        return cls(spec=loaded.spec, fingerprint=loaded.fingerprint, shapes=shapes)

    def to_json(self) -> str:
        return json.dumps({"spec": self.spec, "fingerprint": self.fingerprint, "shapes": self.shapes})

    @classmethod
    def from_json(cls, text: str) -> BaseInfo:
        data = json.loads(text)
        shapes = {name: (int(out_f), int(in_f)) for name, (out_f, in_f) in data["shapes"].items()}
        return cls(spec=data["spec"], fingerprint=data["fingerprint"], shapes=shapes)


@dataclass(frozen=True)
class CacheEntry:
    """One cached pLLM: its index record and where its adapter lives."""

    id: str  # the adapter's content_hash
    base_fingerprint: str
    parents: tuple[str, ...]  # entries it was fine-tuned from or merged from
    created_at: float  # time.time() of the first add anywhere (kept by export/import)
    metrics: dict  # what the uploader reported (loss, steps, seconds, ...)
    label: str | None  # e.g. the style it was trained on; for evaluation only, never used by selection
    coords: list[float] | None  # coordinates on the basis, once explained
    words: list[str] | None  # the basis words the coordinates refer to
    explanation: str | None
    size_bytes: int  # bytes of the adapter files on disk
    path: Path

    def record(self) -> dict:
        """JSON-ready record (everything but the local path)."""
        rec = asdict(self)
        rec.pop("path")
        rec["parents"] = list(self.parents)
        return rec


class PLLMCache:
    """A directory of pLLMs over one base model; safe to share between processes."""

    def __init__(self, root: str | Path, base: BaseInfo | None = None, *, max_bytes: int = MAX_ADAPTER_BYTES):
        """Open the cache at ``root``, creating it when ``base`` is given and there is none yet.

        Opening also removes debris of killed writers (orphan and temp directories) unless a writer is
        active right now, so readers never wait for writers.
        """
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._index = self.root / INDEX_FILE
        self._adapters = self.root / ADAPTERS_DIR
        stored = self._read_base()
        if stored is None:
            if base is None:
                raise CacheError(
                    f"no pLLM cache at {self.root} (no {INDEX_FILE}); pass the base model's BaseInfo to create one"
                )
            self._create(base)
            stored = self._read_base()
            assert stored is not None
        if base is not None and base.fingerprint != stored.fingerprint:
            raise CacheError(
                f"the cache at {self.root} holds pLLMs of base model {stored.fingerprint} ({stored.spec}), "
                f"not {base.fingerprint} ({base.spec}); use another cache directory for this base model"
            )
        self._base = stored
        self._collect_debris()

    @property
    def base(self) -> BaseInfo:
        return self._base

    def __repr__(self) -> str:
        return f"PLLMCache({str(self.root)!r}, base={self._base.spec!r})"

    # --- reading --------------------------------------------------------------------------------
    def get(self, id: str) -> CacheEntry:
        with self._db() as conn:
            row = conn.execute("SELECT * FROM entries WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise UnknownEntryError(f"no pLLM {id!r} in the cache at {self.root}")
        return self._entry(row)

    def entries(self) -> list[CacheEntry]:
        """All entries in the order they were added to this cache."""
        with self._db() as conn:
            rows = conn.execute("SELECT * FROM entries ORDER BY seq").fetchall()
        return [self._entry(row) for row in rows]

    def __len__(self) -> int:
        with self._db() as conn:
            return conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def __contains__(self, id: object) -> bool:
        if not isinstance(id, str):
            return False
        with self._db() as conn:
            return conn.execute("SELECT 1 FROM entries WHERE id = ?", (id,)).fetchone() is not None

    def load_adapter(self, id: str) -> Adapter:
        """The entry's adapter, checked against its id so that corrupted files never pass silently."""
        entry = self.get(id)
        try:
            adapter = Adapter.load(entry.path, max_bytes=self.max_bytes)
        except AdapterError:
            if id not in self:
                raise UnknownEntryError(f"pLLM {id!r} was removed from the cache at {self.root}") from None
            raise
        if adapter.content_hash != id:
            raise CacheError(
                f"the adapter files of pLLM {id!r} in {entry.path} no longer match its content hash "
                f"(corrupted on disk); remove the entry and add it again"
            )
        return adapter

    # --- writing --------------------------------------------------------------------------------
    def add(
        self,
        adapter: Adapter,
        *,
        parents: Iterable[str] = (),
        metrics: dict | None = None,
        label: str | None = None,
    ) -> CacheEntry:
        """Validate and store an adapter. Adding content already cached returns the existing entry as is."""
        return self.insert(adapter, parents=parents, metrics=metrics, label=label)[0]

    def insert(
        self,
        adapter: Adapter,
        *,
        parents: Iterable[str] = (),
        metrics: dict | None = None,
        label: str | None = None,
    ) -> tuple[CacheEntry, bool]:
        """``add``, also telling whether this call created the entry (False: it was cached already).

        Decided under the writer lock, so a caller that undoes its upload (``remove``) after a later
        failure does so only for an entry it created, never for one another writer committed meanwhile.
        """
        if isinstance(parents, str):  # tuple("abc") would silently give three one-letter ids
            raise CacheError(f"parents must be a list of entry ids, got the string {parents!r}")
        return self._add(adapter, parents=tuple(parents), metrics=metrics or {}, label=label)

    def remove(self, id: str) -> None:
        """Remove an entry; refused while other entries name it as parent (their provenance needs it)."""
        with self._writer_lock():
            with self._db() as conn, self._transaction(conn):
                if conn.execute("SELECT 1 FROM entries WHERE id = ?", (id,)).fetchone() is None:
                    raise UnknownEntryError(f"no pLLM {id!r} in the cache at {self.root}")
                children = [
                    child
                    for child, parents in conn.execute("SELECT id, parents FROM entries")
                    if id in json.loads(parents)
                ]
                if children:
                    raise CacheError(f"pLLM {id!r} is a parent of {', '.join(children)}; remove those first")
                conn.execute("DELETE FROM entries WHERE id = ?", (id,))
            # The row is gone (committed), so the directory is debris: a crash here leaves an orphan that
            # the next open removes. Still under the writer lock, so a concurrent re-add keeps its files.
            _remove_tree(self._adapters / id)

    def set_explanation(self, id: str, coords: Sequence[float], words: Sequence[str], explanation: str) -> CacheEntry:
        """Record an entry's coordinates on the basis (one per word) and its explanation text."""
        coords_, words_, explanation_ = _check_explanation(coords, words, explanation)
        with self._db() as conn, self._transaction(conn):
            cur = conn.execute(
                "UPDATE entries SET coords = ?, words = ?, explanation = ? WHERE id = ?",
                (json.dumps(coords_), json.dumps(words_), explanation_, id),
            )
            if cur.rowcount == 0:
                raise UnknownEntryError(f"no pLLM {id!r} in the cache at {self.root}")
        return self.get(id)

    # --- exchange -------------------------------------------------------------------------------
    def export_entry(self, id: str, dest_file: str | Path) -> Path:
        """Write one entry as a .tar: the two PEFT files plus entry.json with its record (atomically)."""
        entry = self.get(id)
        self.load_adapter(id)  # refuse to export corrupted files
        dest = Path(dest_file)
        dest.parent.mkdir(parents=True, exist_ok=True)
        record = {"format": ARCHIVE_FORMAT, **entry.record()}
        with atomic_file(dest) as tmp, tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            data = json.dumps(record, indent=2, sort_keys=True).encode()
            info = tarfile.TarInfo(ENTRY_FILE)
            info.size, info.mtime, info.mode = len(data), int(entry.created_at), 0o644
            tar.addfile(info, _BytesReader(data))
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                tar.add(entry.path / name, arcname=name, recursive=False)
        return dest

    def import_entry(self, src_file: str | Path) -> CacheEntry:
        """Add the entry of an archive written by export_entry; validated like add, parents must be cached."""
        src = Path(src_file)
        with self._unpack_area() as tmp:
            record = self._unpack(src, tmp)
            try:
                adapter = Adapter.load(tmp, max_bytes=self.max_bytes)
            except AdapterError as err:
                raise AdapterError(f"archive {src}: {str(err).removeprefix(f'adapter {tmp}: ')}") from None
        fields = _check_record(record, src)
        if fields["id"] != adapter.content_hash:
            raise CacheError(
                f"archive {src}: entry.json names pLLM {fields['id']!r} but its adapter's content hash "
                f"is {adapter.content_hash!r} (files edited or mixed up)"
            )
        return self._add(
            adapter,
            parents=fields["parents"],
            metrics=fields["metrics"],
            label=fields["label"],
            created_at=fields["created_at"],
            explained=(fields["coords"], fields["words"], fields["explanation"]),
            source=f"archive {src}: ",
        )[0]

    # --- internals ------------------------------------------------------------------------------
    def _add(
        self,
        adapter: Adapter,
        *,
        parents: tuple[str, ...],
        metrics: dict,
        label: str | None,
        created_at: float | None = None,
        explained: tuple | None = None,
        source: str = "",
    ) -> tuple[CacheEntry, bool]:
        """The entry, and whether this call created it. Everything is checked before anything is written."""
        validate_adapter(adapter, self._base.fingerprint, self._base.shapes, max_bytes=self.max_bytes)
        if not all(isinstance(p, str) for p in parents):
            raise CacheError(f"{source}parents must be entry ids (strings), got {parents!r}")
        if label is not None and not isinstance(label, str):
            raise CacheError(f"{source}label must be a string or None, got {label!r}")
        if label is not None:
            _check_size(f"{source}label", label.encode("utf-8", "surrogatepass"))
        if not isinstance(metrics, dict):
            raise CacheError(f"{source}metrics must be a dict, got {type(metrics).__name__}")
        try:
            metrics_json = json.dumps(metrics, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise CacheError(f"{source}metrics must be JSON-serialisable: {err}") from err
        _check_size(f"{source}metrics", metrics_json.encode())
        coords = words = explanation = None
        if explained is not None and any(x is not None for x in explained):
            coords, words, explanation = _check_explanation(*explained, source=source)
        id = adapter.content_hash
        path = self._adapters / id
        with self._writer_lock(), self._db() as conn:
            row = conn.execute("SELECT * FROM entries WHERE id = ?", (id,)).fetchone()
            if row is not None:
                return self._entry(row), False
            known = {r[0] for r in conn.execute("SELECT id FROM entries")}
            missing = [p for p in dict.fromkeys(parents) if p not in known]
            if missing:
                raise CacheError(
                    f"{source}unknown parent pLLM(s) {', '.join(missing)}: add (or import) the parents first"
                )
            try:
                adapter.save(path)  # temp dir + rename
                _fsync_tree(path)
                size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
                with self._transaction(conn):
                    conn.execute(
                        "INSERT INTO entries (id, base_fingerprint, parents, created_at, metrics, label, "
                        "coords, words, explanation, size_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            id,
                            adapter.base_fingerprint,
                            json.dumps(list(dict.fromkeys(parents))),
                            time.time() if created_at is None else float(created_at),
                            metrics_json,
                            label,
                            None if coords is None else json.dumps(coords),
                            None if words is None else json.dumps(words),
                            explanation,
                            size,
                        ),
                    )
            except BaseException:
                _remove_tree(path)  # no row: the directory must not stay
                raise
            row = conn.execute("SELECT * FROM entries WHERE id = ?", (id,)).fetchone()
        return self._entry(row), True

    @contextmanager
    def _unpack_area(self) -> Iterator[Path]:
        """A fresh directory in the cache's ``tmp/``, removed on exit; a kill leaves it to the next open.

        The shared ``tmp.lock`` keeps opens (which clear ``tmp/`` only when they get it exclusively)
        from removing it while this process still unpacks.
        """
        with self._flock(TMP_LOCK_FILE, shared=True, holder="an open clearing tmp/"):
            area = self.root / TMP_DIR
            area.mkdir(exist_ok=True)
            path = Path(tempfile.mkdtemp(prefix="import-", dir=area))
            try:
                yield path
            finally:
                _remove_tree(path)

    def _unpack(self, src: Path, dest: Path) -> dict:
        """Extract exactly the three archive files into ``dest``, checking names, types and sizes first."""
        expected = {ENTRY_FILE: MAX_RECORD_BYTES, CONFIG_FILE: MAX_CONFIG_BYTES, WEIGHTS_FILE: self.max_bytes}
        try:
            with tarfile.open(src, mode="r:*") as tar:
                members = tar.getmembers()
                names = [m.name for m in members]
                if sorted(names) != sorted(expected):
                    raise CacheError(f"archive {src} must hold exactly {sorted(expected)}, found {sorted(names)}")
                for m in members:
                    if not m.isfile():
                        raise CacheError(f"archive {src}: {m.name} is not a regular file")
                    if m.size > expected[m.name]:
                        raise AdapterError(
                            f"archive {src}: {m.name} is {m.size} bytes, over the {expected[m.name]}-byte limit"
                        )
                for m in members:
                    fh = tar.extractfile(m)
                    assert fh is not None
                    data = fh.read(m.size + 1)
                    if len(data) != m.size:
                        raise CacheError(f"archive {src} is truncated ({m.name} is incomplete)")
                    (dest / m.name).write_bytes(data)
        except FileNotFoundError as err:
            raise CacheError(f"archive {src} does not exist") from err
        except (tarfile.TarError, EOFError, OSError) as err:
            raise CacheError(f"archive {src} is not a readable entry archive ({err})") from err
        try:
            record = json.loads((dest / ENTRY_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CacheError(f"archive {src}: {ENTRY_FILE} is not valid JSON ({err})") from err
        if not isinstance(record, dict) or record.get("format") != ARCHIVE_FORMAT:
            raise CacheError(f"archive {src}: {ENTRY_FILE} is not an {ARCHIVE_FORMAT} record")
        return record

    def _entry(self, row: sqlite3.Row) -> CacheEntry:
        def opt(value: str | None) -> object:
            return None if value is None else json.loads(value)

        return CacheEntry(
            id=row["id"],
            base_fingerprint=row["base_fingerprint"],
            parents=tuple(json.loads(row["parents"])),
            created_at=row["created_at"],
            metrics=json.loads(row["metrics"]),
            label=row["label"],
            coords=opt(row["coords"]),
            words=opt(row["words"]),
            explanation=row["explanation"],
            size_bytes=row["size_bytes"],
            path=self._adapters / row["id"],
        )

    def _read_base(self) -> BaseInfo | None:
        """The stored BaseInfo; None when there is no index yet (or one whose creation never committed)."""
        if not self._index.is_file():
            return None
        try:
            with self._db() as conn:
                rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except CacheError as err:
            if "no such table" in str(err):
                return None
            raise
        if "base" not in rows:
            return None
        if int(rows.get("schema_version", 0)) > SCHEMA_VERSION:
            raise CacheError(
                f"the cache at {self.root} has schema {rows['schema_version']}, newer than this xpert-fl "
                f"understands ({SCHEMA_VERSION}); upgrade xpert-fl"
            )
        return BaseInfo.from_json(rows["base"])

    def _create(self, base: BaseInfo) -> None:
        self._adapters.mkdir(parents=True, exist_ok=True)
        with self._writer_lock(), self._db() as conn:
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: readers never block on the writer
            with self._transaction(conn):
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.executemany(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    [("base", base.to_json()), ("schema_version", str(SCHEMA_VERSION))],
                )

    def _collect_debris(self) -> None:
        """Remove adapter dirs without a row (killed add/remove) and temp dirs, skipped while one writes,
        and archives a killed import left unpacked in ``tmp/``, skipped while one imports."""
        self._adapters.mkdir(parents=True, exist_ok=True)
        (self.root / TMP_DIR).mkdir(exist_ok=True)
        with self._writer_lock(blocking=False) as held:
            if held:
                with self._db() as conn:
                    ids = {r[0] for r in conn.execute("SELECT id FROM entries")}
                for child in self._adapters.iterdir():
                    if child.name.startswith(".") or child.name not in ids:
                        _remove_tree(child)
        with self._flock(TMP_LOCK_FILE, blocking=False) as held:
            if held:
                for child in (self.root / TMP_DIR).iterdir():
                    _remove_tree(child)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection (one per call) so that the cache can be shared between processes."""
        try:
            with closing(sqlite3.connect(self._index, timeout=BUSY_TIMEOUT_S, isolation_level=None)) as conn:
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA synchronous = FULL")
                yield conn
        except sqlite3.Error as err:
            raise CacheError(f"cache index {self._index}: {err}") from err

    @staticmethod
    @contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _writer_lock(self, blocking: bool = True) -> AbstractContextManager[bool]:
        """Exclusive cross-process lock for writers; yields False when not blocking and it is taken."""
        return self._flock(LOCK_FILE, blocking=blocking)

    @contextmanager
    def _flock(
        self, name: str, *, shared: bool = False, blocking: bool = True, holder: str = "another writer"
    ) -> Iterator[bool]:
        """Cross-process lock on the file ``root/name``; yields False when not blocking and it is taken."""
        if fcntl is None:  # pragma: no cover - Windows
            yield True
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / name, "a+b") as fh:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not blocking:
                        yield False
                        return
                    if time.monotonic() > deadline:
                        raise CacheError(
                            f"the cache at {self.root} stayed locked by {holder} for {LOCK_TIMEOUT_S:.0f} s"
                        ) from None
                    time.sleep(0.01)
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


class _BytesReader:
    """Minimal file object for tarfile.addfile."""

    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._pos + size
        chunk, self._pos = self._data[self._pos : end], min(end, len(self._data))
        return chunk


def _check_explanation(
    coords: Sequence[float] | None, words: Sequence[str] | None, explanation: str | None, source: str = ""
) -> tuple[list[float], list[str], str]:
    try:
        coords_ = [float(c) for c in coords]  # type: ignore[union-attr]
    except (TypeError, ValueError) as err:
        raise CacheError(f"{source}coords must be a sequence of numbers, got {_short(coords)}") from err
    if not all(math.isfinite(c) for c in coords_):
        raise CacheError(f"{source}coords must be finite, got {_short(coords_)}")
    if isinstance(words, str) or words is None or not all(isinstance(w, str) for w in words):
        raise CacheError(f"{source}words must be a list of strings, got {_short(words)}")
    words_ = list(words)
    if len(words_) != len(coords_):
        raise CacheError(
            f"{source}{len(coords_)} coords but {len(words_)} words: each coordinate needs its basis word"
        )
    if not isinstance(explanation, str):
        raise CacheError(f"{source}explanation must be a string, got {_short(explanation)}")
    _check_size(f"{source}words", json.dumps(words_).encode())  # coords: as many, a number each
    _check_size(f"{source}explanation", explanation.encode("utf-8", "surrogatepass"))
    return coords_, words_, explanation


def _check_size(what: str, data: bytes) -> None:
    if len(data) > MAX_FIELD_BYTES:
        raise CacheError(f"{what} is {len(data)} bytes, over the {MAX_FIELD_BYTES}-byte limit")


def _check_record(record: dict, src: Path) -> dict:
    """The fields of an archive's entry.json, type-checked."""
    fields = {}
    for key, types in (("id", str), ("created_at", int | float), ("parents", list), ("metrics", dict)):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, types):
            raise CacheError(f"archive {src}: {ENTRY_FILE} field {key!r} is missing or malformed ({value!r})")
        fields[key] = value
    fields["parents"] = tuple(fields["parents"])
    for key in ("label", "coords", "words", "explanation"):
        fields[key] = record.get(key)
    return fields


def _fsync_tree(path: Path) -> None:
    """Flush an adapter directory (files, the directory, its parent) before its row commits."""
    for target in [*sorted(p for p in path.iterdir() if p.is_file()), path, path.parent]:
        try:
            fd = os.open(target, os.O_RDONLY)
        except OSError:  # pragma: no cover - directories cannot be opened on some platforms
            continue
        try:
            os.fsync(fd)
        except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
            pass
        finally:
            os.close(fd)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
