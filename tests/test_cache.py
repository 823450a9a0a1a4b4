"""PLLMCache: exact round trips, bad input rejected with the cache untouched, consistency after a kill."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import load_peft_weights

from xpert_fl.adapters import CONFIG_FILE, WEIGHTS_FILE, Adapter, AdapterError, validate_adapter
from xpert_fl.cache import (
    ENTRY_FILE,
    INDEX_FILE,
    BaseInfo,
    CacheError,
    PLLMCache,
    UnknownEntryError,
)
from xpert_fl.models import LoadedModel

REPO = Path(__file__).resolve().parents[1]


# --- fixtures and helpers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wrapped(base: LoadedModel):
    """A real PEFT LoRA model over a copy of the base (the shared base model is never wrapped)."""
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False
    )
    return get_peft_model(copy.deepcopy(base.model), config)


@pytest.fixture(scope="module")
def info(base: LoadedModel) -> BaseInfo:
    return BaseInfo.from_loaded(base)


@pytest.fixture(scope="module")
def lora(wrapped, base: LoadedModel) -> Adapter:
    return Adapter.from_peft(wrapped, base.fingerprint)


def variant(adapter: Adapter, i: int) -> Adapter:
    """Another adapter of the same shape (distinct content for i != 0)."""
    tensors = {k: v + i * 1e-3 for k, v in adapter.tensors.items()}
    return Adapter(copy.deepcopy(adapter.config), tensors, adapter.base_fingerprint)


def with_tensors(adapter: Adapter, edit: Callable[[dict], None], fingerprint: str | None = None) -> Adapter:
    tensors = {k: v.clone() for k, v in adapter.tensors.items()}
    edit(tensors)
    return Adapter(copy.deepcopy(adapter.config), tensors, fingerprint or adapter.base_fingerprint)


def snapshot(root: Path) -> tuple:
    """Everything observable: the records, every file's bytes, and the index's logical content."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not rel.startswith(INDEX_FILE):  # the index is compared below: its WAL files come and go
            files[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    with closing(sqlite3.connect(root / INDEX_FILE)) as conn:
        dump = list(conn.iterdump())
    return PLLMCache(root).entries(), files, dump


def assert_consistent(root: Path, info: BaseInfo) -> PLLMCache:
    """Reopen (collecting debris) and check: one directory per row; each loads, validates, hashes to id."""
    cache = PLLMCache(root)
    entries = cache.entries()
    assert sorted(p.name for p in (root / "adapters").iterdir()) == sorted(e.id for e in entries)
    for e in entries:
        adapter = cache.load_adapter(e.id)
        validate_adapter(adapter, info.fingerprint, info.shapes)
        assert adapter.content_hash == e.id
        assert e.size_bytes == sum(f.stat().st_size for f in e.path.iterdir())
    return cache


def rewrite_archive(src: Path, dest: Path, replace: dict[str, bytes | None]) -> Path:
    """Copy an entry archive, replacing (bytes) or dropping (None) members or adding new ones."""
    with tarfile.open(src) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    members.update(replace)
    with tarfile.open(dest, "w") as tar:
        for name, data in members.items():
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return dest


# --- round trips ------------------------------------------------------------------------------------
def test_base_info_json_round_trip_and_plain_model_required(base, info, wrapped):
    assert info.fingerprint == base.fingerprint and info.spec == base.spec
    assert info.shapes["model.layers.0.self_attn.q_proj"] == (576, 576)
    assert not any(".lora_" in name for name in info.shapes)
    assert BaseInfo.from_json(info.to_json()) == info
    peft_loaded = LoadedModel(base.spec, base.source, wrapped, base.tokenizer, 0.0)
    with pytest.raises(CacheError, match="before get_peft_model"):
        BaseInfo.from_loaded(peft_loaded)


def test_round_trip_is_exact(tmp_path, info, lora):
    cache = PLLMCache(tmp_path / "c", info)
    entry = cache.add(lora, metrics={"loss": 1.25, "steps": 40}, label="pirate")
    assert entry.id == lora.content_hash
    assert (entry.base_fingerprint, entry.parents, entry.label) == (info.fingerprint, (), "pirate")
    assert entry.metrics == {"loss": 1.25, "steps": 40}
    assert entry.coords is entry.words is entry.explanation is None
    assert entry.path == tmp_path / "c" / "adapters" / entry.id
    assert sorted(p.name for p in entry.path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert entry.size_bytes == sum(p.stat().st_size for p in entry.path.iterdir()) > lora.num_bytes

    reopened = PLLMCache(tmp_path / "c")  # no BaseInfo needed to open
    assert reopened.base == info
    assert reopened.entries() == [entry]
    loaded = reopened.load_adapter(entry.id)
    assert loaded.config == lora.config
    assert loaded.base_fingerprint == lora.base_fingerprint
    assert loaded.tensors.keys() == lora.tensors.keys()
    for name, tensor in lora.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype
        assert torch.equal(loaded.tensors[name], tensor), name
    assert loaded.content_hash == lora.content_hash == entry.id
    # Plain PEFT format: PEFT's own loader reads the directory.
    peft_tensors = load_peft_weights(str(entry.path))
    assert torch.equal(peft_tensors[next(iter(lora.tensors))], next(iter(lora.tensors.values())))


def test_entries_get_remove_len_contains(tmp_path, info, lora):
    cache = PLLMCache(tmp_path, info)
    added = [cache.add(variant(lora, i), label=f"s{i}") for i in (3, 1, 2)]
    assert [e.id for e in cache.entries()] == [e.id for e in added]  # insertion order, not id order
    assert [e.created_at for e in added] == sorted(e.created_at for e in added)
    assert len(cache) == 3 and added[1].id in cache and "nope" not in cache and 3 not in cache
    assert cache.get(added[1].id) == added[1]

    cache.remove(added[1].id)
    assert [e.id for e in cache.entries()] == [added[0].id, added[2].id]
    assert added[1].id not in cache and not added[1].path.exists()
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == sorted([added[0].id, added[2].id])
    with pytest.raises(UnknownEntryError, match="no pLLM 'nope'"):
        cache.get("nope")
    with pytest.raises(KeyError):  # unknown ids behave like a mapping's
        cache.load_adapter(added[1].id)
    with pytest.raises(CacheError, match="no pLLM"):
        cache.remove(added[1].id)


def test_add_is_idempotent(tmp_path, info, lora):
    cache = PLLMCache(tmp_path, info)
    first = cache.add(lora, metrics={"loss": 1.0})
    before = snapshot(tmp_path)
    again = cache.add(variant(lora, 0), metrics={"loss": 9.0}, label="other")  # same content, new object
    assert again == first
    assert snapshot(tmp_path) == before


def test_parents_must_exist_and_are_kept(tmp_path, info, lora):
    cache = PLLMCache(tmp_path, info)
    parent = cache.add(variant(lora, 1))
    before = snapshot(tmp_path)
    with pytest.raises(CacheError, match="unknown parent pLLM.*0123456789"):
        cache.add(variant(lora, 2), parents=[parent.id, "0123456789"])
    assert snapshot(tmp_path) == before
    with pytest.raises(CacheError, match="list of entry ids"):
        cache.add(variant(lora, 2), parents=parent.id)
    assert snapshot(tmp_path) == before
    child = cache.add(variant(lora, 2), parents=[parent.id])
    assert PLLMCache(tmp_path).get(child.id).parents == (parent.id,)
    with pytest.raises(CacheError, match="is a parent of"):
        cache.remove(parent.id)
    cache.remove(child.id)
    cache.remove(parent.id)
    assert len(cache) == 0


def test_set_explanation_persists_across_reopen(tmp_path, info, lora):
    cache = PLLMCache(tmp_path, info)
    entry = cache.add(lora)
    updated = cache.set_explanation(entry.id, torch.tensor([0.5, 0.25]), ["sarcastic", "concise"], "0.50 sarcastic")
    assert (updated.coords, updated.words) == ([0.5, 0.25], ["sarcastic", "concise"])
    assert PLLMCache(tmp_path).get(entry.id) == updated
    before = snapshot(tmp_path)
    with pytest.raises(CacheError, match="2 coords but 1 words"):
        cache.set_explanation(entry.id, [0.5, 0.25], ["sarcastic"], "x")
    with pytest.raises(CacheError, match="finite"):
        cache.set_explanation(entry.id, [float("nan")], ["sarcastic"], "x")
    with pytest.raises(UnknownEntryError):
        cache.set_explanation("nope", [0.5], ["sarcastic"], "x")
    assert snapshot(tmp_path) == before


def test_export_import_into_second_cache(tmp_path, info, lora):
    src = PLLMCache(tmp_path / "a", info)
    parent = src.add(variant(lora, 1), metrics={"loss": 2.0}, label="formal")
    child = src.add(variant(lora, 2), parents=[parent.id], metrics={"loss": 1.5})
    child = src.set_explanation(child.id, [0.7], ["formal"], "0.70 formal")
    archive = src.export_entry(child.id, tmp_path / "out" / "child.tar")
    src.export_entry(parent.id, tmp_path / "out" / "parent.tar")
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == sorted([ENTRY_FILE, CONFIG_FILE, WEIGHTS_FILE])
    assert not [p for p in archive.parent.iterdir() if p.name.startswith(".")]

    dst = PLLMCache(tmp_path / "b", info)
    with pytest.raises(CacheError, match="unknown parent"):  # parents travel first
        dst.import_entry(archive)
    assert len(dst) == 0 and not list((tmp_path / "b" / "adapters").iterdir())
    dst.import_entry(tmp_path / "out" / "parent.tar")
    imported = dst.import_entry(archive)
    assert imported.record() == child.record()  # id, provenance, metrics, time, explanation, size
    assert imported.path.parent == tmp_path / "b" / "adapters"
    a, b = src.load_adapter(child.id), dst.load_adapter(child.id)
    assert a.config == b.config and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert dst.import_entry(archive) == imported  # idempotent
    assert [e.id for e in dst.entries()] == [parent.id, child.id]


# --- bad input ----------------------------------------------------------------------------------
Q0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _set(name: str, value: float) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors[name][1, 2] = value

    return edit


BAD_ADAPTERS = {
    "other base": (
        lambda a: with_tensors(a, lambda t: None, fingerprint="feedfacefeedface"),
        "is for base model",
    ),
    "missing tensor": (lambda a: with_tensors(a, lambda t: t.pop(Q0)), "missing 1 tensor"),
    "extra tensor": (
        lambda a: with_tensors(a, lambda t: t.update({Q0.replace("q_proj", "k_proj"): torch.zeros(4, 576)})),
        "unexpected tensor",
    ),
    "wrong shape": (
        lambda a: with_tensors(a, lambda t: t.update({Q0: torch.zeros(4, 575)})),
        r"shape \(4, 575\)",
    ),
    "nan": (lambda a: with_tensors(a, _set(Q0, float("nan"))), "NaN or Inf"),
    "inf": (lambda a: with_tensors(a, _set(Q0, float("-inf"))), "NaN or Inf"),
    "int dtype": (
        lambda a: with_tensors(a, lambda t: t.update({Q0: t[Q0].to(torch.int32)})),
        "floating point",
    ),
}


@pytest.fixture
def populated(tmp_path, info, lora) -> Path:
    root = tmp_path / "cache"
    PLLMCache(root, info).add(variant(lora, 7), label="seed")
    return root


@pytest.mark.parametrize("kind", list(BAD_ADAPTERS))
def test_bad_adapter_rejected_and_cache_unchanged(populated, lora, kind):
    make, message = BAD_ADAPTERS[kind]
    bad = make(lora)
    before = snapshot(populated)
    with pytest.raises(AdapterError, match=message):
        PLLMCache(populated).add(bad)
    assert snapshot(populated) == before


def test_oversized_adapter_rejected_and_cache_unchanged(populated, lora, tmp_path):
    small = PLLMCache(populated, max_bytes=lora.num_bytes - 1)
    before = snapshot(populated)
    with pytest.raises(AdapterError, match="over the .*-byte limit"):
        small.add(lora)
    archive = PLLMCache(tmp_path / "src", small.base).add(lora).path  # and via import: checked before extraction
    PLLMCache(tmp_path / "src").export_entry(archive.name, tmp_path / "big.tar")
    with pytest.raises(AdapterError, match=f"{WEIGHTS_FILE} is .* bytes, over the"):
        small.import_entry(tmp_path / "big.tar")
    assert snapshot(populated) == before


def test_truncated_safetensors_rejected(populated, info, lora, tmp_path):
    saved = lora.save(tmp_path / "plain")
    weights = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(AdapterError, match="unreadable or truncated"):
        Adapter.load(saved)

    good = PLLMCache(tmp_path / "src", info).export_entry(
        PLLMCache(tmp_path / "src").add(lora).id, tmp_path / "good.tar"
    )
    bad = rewrite_archive(good, tmp_path / "bad.tar", {WEIGHTS_FILE: weights[: len(weights) // 2]})
    before = snapshot(populated)
    with pytest.raises(AdapterError, match="unreadable or truncated"):
        PLLMCache(populated).import_entry(bad)
    cut = tmp_path / "cut.tar"  # the archive itself cut short
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CacheError, match="truncated|not a readable"):
        PLLMCache(populated).import_entry(cut)
    assert snapshot(populated) == before


def test_bad_archives_rejected_and_cache_unchanged(populated, info, lora, tmp_path):
    other = BaseInfo("other-model", "feedfacefeedface", info.shapes)
    foreign = PLLMCache(tmp_path / "foreign", other)
    foreign_id = foreign.add(with_tensors(lora, lambda t: None, fingerprint=other.fingerprint)).id
    foreign_tar = foreign.export_entry(foreign_id, tmp_path / "foreign.tar")
    src = PLLMCache(tmp_path / "src", info)
    good = src.export_entry(src.add(lora).id, tmp_path / "good.tar")
    record = json.loads(tarfile.open(good).extractfile(ENTRY_FILE).read())
    cases = {
        "other base": (foreign_tar, AdapterError, "is for base model feedfacefeedface"),
        "missing file": (
            rewrite_archive(good, tmp_path / "m.tar", {CONFIG_FILE: None}),
            CacheError,
            "exactly",
        ),
        "extra file": (rewrite_archive(good, tmp_path / "e.tar", {"../evil": b"x"}), CacheError, "exactly"),
        "id mismatch": (
            rewrite_archive(good, tmp_path / "i.tar", {ENTRY_FILE: json.dumps({**record, "id": "0" * 20}).encode()}),
            CacheError,
            "content hash",
        ),
        "bad record": (
            rewrite_archive(good, tmp_path / "r.tar", {ENTRY_FILE: b"{"}),
            CacheError,
            "not valid JSON",
        ),
        "not a tar": (tmp_path / "cache" / "adapters", CacheError, "not a readable"),
    }
    before = snapshot(populated)
    for name, (archive, error, message) in cases.items():
        with pytest.raises(error, match=message):
            PLLMCache(populated).import_entry(archive)
        assert snapshot(populated) == before, name
    assert not (tmp_path / "evil").exists()


def test_open_rules(tmp_path, info, lora):
    with pytest.raises(CacheError, match="no pLLM cache"):
        PLLMCache(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    PLLMCache(tmp_path / "c", info).add(lora)
    before = snapshot(tmp_path / "c")
    other = BaseInfo("other-model", "feedfacefeedface", info.shapes)
    with pytest.raises(CacheError, match="holds pLLMs of base model"):
        PLLMCache(tmp_path / "c", other)
    assert PLLMCache(tmp_path / "c", info).base == info
    assert snapshot(tmp_path / "c") == before


def test_corrupted_files_are_detected_on_load(tmp_path, info, lora):
    cache = PLLMCache(tmp_path, info)
    entry = cache.add(lora)
    weights = entry.path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # flip bits of a tensor value: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="no longer match its content hash"):
        cache.load_adapter(entry.id)


# --- concurrency and crashes ------------------------------------------------------------------------
def test_concurrent_reader_never_sees_a_partial_entry(tmp_path, info, lora):
    cache = PLLMCache(tmp_path, info)
    cache.add(variant(lora, 0))
    reading, done, problems, loads = threading.Event(), threading.Event(), [], []

    def reader() -> None:
        view = PLLMCache(tmp_path)
        while not done.is_set():
            for e in view.entries():
                try:
                    view.load_adapter(e.id)
                    loads.append(e.id)
                    reading.set()
                except UnknownEntryError:
                    pass  # removed between listing and loading: fine
                except Exception as err:  # noqa: BLE001 - any other failure is the bug under test
                    problems.append(repr(err))

    thread = threading.Thread(target=reader)
    thread.start()
    assert reading.wait(timeout=30)
    try:
        for i in range(1, 7):
            entry = cache.add(variant(lora, i))
            if i % 2 == 0:
                cache.remove(entry.id)
    finally:
        done.set()
        thread.join()
    assert problems == []
    assert len(loads) > 0
    assert len(assert_consistent(tmp_path, info)) == 4


CRASH_SERVER = r"""
import os, sys, tempfile, time, traceback
import torch
import xpert_fl.adapters as xa
import xpert_fl.cache as xc

def hang(event):
    print(f"{os.getpid()} {event}", flush=True)
    time.sleep(600)

def variant(adapter, i):
    tensors = {k: v + i * 1e-3 for k, v in adapter.tensors.items()}
    return xa.Adapter(dict(adapter.config), tensors, adapter.base_fingerprint)

def work(mode, root):
    torch.set_num_threads(1)
    cache = xc.PLLMCache(root)
    template = cache.load_adapter(cache.entries()[0].id)
    if mode == "mid-save":  # killed while the safetensors file is half written
        real_save_file = xa.save_file
        def partial(tensors, path, metadata=None):
            real_save_file(tensors, path, metadata=metadata)
            os.truncate(path, os.path.getsize(path) // 2)
            hang("saving")
        xa.save_file = partial
        cache.add(variant(template, 1))
    elif mode == "before-commit":  # killed with the directory in place but its row not committed
        real_save = xa.Adapter.save
        def save(self, directory):
            real_save(self, directory)
            hang("saved")
        xa.Adapter.save = save
        cache.add(variant(template, 1))
    elif mode == "mid-remove":  # killed after the row is deleted, before the directory is
        entry = cache.add(variant(template, 1))
        xc._remove_tree = lambda path: hang("removing")
        cache.remove(entry.id)
    elif mode == "mid-import":  # killed with the archive <root>.tar unpacked, before its adapter is read
        tempfile.tempdir = root + ".tmpdir"  # this writer's $TMPDIR, where nothing may be left behind
        xa.Adapter.load = classmethod(lambda cls, directory, max_bytes=None: hang("unpacked"))
        cache.import_entry(root + ".tar")
    elif mode.startswith("loop"):  # killed at a random moment of a stream of adds and removes
        offset = int(mode[4:]) * 1000
        for i in range(1, 10**6):
            entry = cache.add(variant(template, offset + i))
            if i % 3 == 0:
                cache.remove(entry.id)
            print(f"{os.getpid()} step {i}", flush=True)
    hang("finished")

print("ready", flush=True)
for line in sys.stdin:
    cmd, arg, *rest = line.split()
    if cmd == "run":
        pid = os.fork()
        if pid == 0:
            try:
                work(arg, rest[0])
            except BaseException:
                traceback.print_exc()
            os._exit(3)
        print(f"{pid} started", flush=True)
    elif cmd == "reap":
        _, status = os.waitpid(int(arg), 0)
        print(f"{arg} reaped {os.waitstatus_to_exitcode(status)}", flush=True)
"""


class CrashServer:
    """A subprocess that imports torch/PEFT once and forks one writer per scenario, to be SIGKILLed."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_SERVER],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.live: set[int] = set()
        self.ready = False
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, needle: str, timeout: float = 120.0) -> str:
        """The next line containing ``needle`` (lines of earlier writers are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"crash server: no line with {needle!r} within {timeout} s")
            if needle in line:
                return line

    def start(self, mode: str, root: Path) -> int:
        if not self.ready:
            self.expect("ready")
            self.ready = True
        self.proc.stdin.write(f"run {mode} {root}\n")
        self.proc.stdin.flush()
        pid = int(self.expect("started").split()[0])
        self.live.add(pid)
        return pid

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.proc.stdin.write(f"reap {pid}\n")
        self.proc.stdin.flush()
        code = int(self.expect(f"{pid} reaped", timeout=30).split()[-1])
        self.live.discard(pid)
        assert code == -signal.SIGKILL, f"writer exited with {code} before the kill"

    def close(self) -> None:
        for pid in self.live:
            os.kill(pid, signal.SIGKILL)
        self.proc.stdin.close()
        self.proc.kill()  # our own server; nothing left to flush
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def crash_server():
    """Started with the module, so that its imports (~8 s on 2 cores) overlap with the other tests."""
    if not hasattr(os, "fork"):
        yield None
        return
    server = CrashServer()
    yield server
    server.close()


@pytest.fixture
def crasher(crash_server):
    if crash_server is None:
        pytest.skip("crash tests fork a writer; this platform has no fork()")
    return crash_server


def test_kill_mid_save_leaves_consistent_cache(populated, info, crasher):
    before = snapshot(populated)
    pid = crasher.start("mid-save", populated)
    crasher.expect(f"{pid} saving")
    crasher.kill(pid)
    debris = [p for p in (populated / "adapters").iterdir() if p.name.startswith(".")]
    assert debris and (debris[0] / WEIGHTS_FILE).is_file()  # the kill really hit a half-written adapter
    cache = assert_consistent(populated, info)
    assert snapshot(populated) == before
    assert len(cache) == 1


def test_kill_before_commit_hides_entry_and_open_spares_live_writer(populated, info, crasher):
    before = snapshot(populated)
    pid = crasher.start("before-commit", populated)
    crasher.expect(f"{pid} saved")
    # Writer alive, adapter directory complete but uncommitted: readers see the old state, and opening
    # does not treat the writer's directory as debris.
    adapters = sorted(p.name for p in (populated / "adapters").iterdir())
    assert len(adapters) == 2
    view = PLLMCache(populated)
    assert view.entries() == before[0]
    assert sorted(p.name for p in (populated / "adapters").iterdir()) == adapters
    crasher.kill(pid)
    assert_consistent(populated, info)
    assert snapshot(populated) == before


def test_kill_mid_remove_completes_the_removal(populated, info, crasher):
    before = snapshot(populated)
    pid = crasher.start("mid-remove", populated)
    crasher.expect(f"{pid} removing")
    crasher.kill(pid)
    assert len(list((populated / "adapters").iterdir())) == 2  # row deleted, directory left behind
    assert_consistent(populated, info)
    assert snapshot(populated)[:2] == before[:2]  # same entries and files (the index keeps its counter)


def test_kill_mid_import_leaves_nothing_in_tmpdir_and_open_clears_the_unpacked_archive(
    populated, info, lora, tmp_path, crasher
):
    src = PLLMCache(tmp_path / "src", info)
    src.export_entry(src.add(variant(lora, 3)).id, Path(f"{populated}.tar"))
    tmpdir = Path(f"{populated}.tmpdir")
    tmpdir.mkdir()
    before = snapshot(populated)
    pid = crasher.start("mid-import", populated)
    crasher.expect(f"{pid} unpacked")
    # Importer alive: its archive is unpacked in the cache's own tmp/, which an open leaves alone.
    PLLMCache(populated)
    (unpacked,) = (populated / "tmp").iterdir()
    assert (unpacked / CONFIG_FILE).is_file() and (unpacked / WEIGHTS_FILE).is_file()
    crasher.kill(pid)
    assert list(tmpdir.iterdir()) == []
    assert_consistent(populated, info)  # the open after the kill clears tmp/
    assert list((populated / "tmp").iterdir()) == []
    assert snapshot(populated) == before


def test_kill_at_random_moments_leaves_consistent_cache(populated, info, crasher):
    rng = random.Random(0)
    seen = set()
    for round_ in range(3):
        pid = crasher.start(f"loop{round_}", populated)
        crasher.expect(f"{pid} step 2")
        time.sleep(rng.uniform(0.0, 0.3))
        crasher.kill(pid)
        cache = assert_consistent(populated, info)
        seen.add(len(cache))
        assert cache.entries()[0].label == "seed"
    assert max(seen) >= 3  # the writer made progress before each kill
