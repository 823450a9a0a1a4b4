"""Bounds on what an upload may carry: the LoRA config (only what the project loads and merges), tensor
values, config file, metadata, metrics, label and explanation. Each bad case is refused with the project's
own error naming the field, and nothing reaches the cache. Also: ``insert`` reports whether it created the
entry, and imports unpack in the cache's own ``tmp/``, never in $TMPDIR.

No model is loaded: the cache is over a fake base model with one 6x4 linear layer.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

from xpert_fl.adapters import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    Adapter,
    AdapterError,
    check_config,
)
from xpert_fl.cache import MAX_FIELD_BYTES, TMP_DIR, BaseInfo, CacheError, PLLMCache

MODULE = "model.layers.0.self_attn.q_proj"
BASE = BaseInfo("fake", "fp0", {MODULE: (6, 4), "model.layers.0.self_attn.v_proj": (6, 4)})
A, B = f"base_model.model.{MODULE}.lora_A.weight", f"base_model.model.{MODULE}.lora_B.weight"


def adapter(seed: int = 0, config: dict | None = None, **tensors: torch.Tensor) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    cfg = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "peft_type": "LORA", **(config or {})}
    return Adapter(cfg, {A: tensors.get("a", torch.randn(2, 4, generator=g)),
                         B: tensors.get("b", torch.randn(6, 2, generator=g))}, "fp0")


def snapshot(root: Path) -> tuple:
    """The records and every file's bytes (the index through its records: WAL files come and go)."""
    files = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
             for p in sorted(root.rglob("*")) if not p.name.startswith("index.sqlite")}
    return PLLMCache(root).entries(), files


@pytest.fixture
def cache(tmp_path) -> PLLMCache:
    cache = PLLMCache(tmp_path / "cache", BASE)
    cache.add(adapter(100), label="seed")
    return cache


def test_plain_configs_pass_including_what_peft_and_merges_write():
    from peft import LoraConfig

    from xpert_fl.adapters import _jsonable
    from xpert_fl.merge import merge_adapters

    peft = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM", lora_dropout=0.05)
    check_config(json.loads(json.dumps(peft.to_dict(), default=_jsonable)))
    check_config(merge_adapters([adapter(1), adapter(2, {"use_rslora": True})], [0.5, 0.5]).config)
    check_config(adapter(config={"lora_alpha": -16.0, "r": 1024}).config)  # the bounds themselves


BAD_CONFIGS = {
    "not an object": ([2, 4], "must be a JSON object"),
    "rank true": ({"r": True}, "r must be an integer in 1..1024"),
    "rank float": ({"r": 2.0}, "r must be an integer"),
    "rank zero": ({"r": 0}, "r must be an integer in 1..1024"),
    "rank huge": ({"r": 4096}, "r must be an integer in 1..1024"),
    "no alpha": ({"lora_alpha": None}, "missing lora_alpha"),  # None: the key is dropped
    "alpha huge": ({"lora_alpha": 1e30}, r"lora_alpha must be a finite number, \|lora_alpha\| <= 10000"),
    "alpha nan": ({"lora_alpha": float("nan")}, "lora_alpha must be"),
    "alpha huge int": ({"lora_alpha": 10**400}, "lora_alpha must be"),
    "alpha bool": ({"lora_alpha": True}, "lora_alpha must be"),
    "targets regex": ({"target_modules": ".*q_proj"}, "target_modules must be a non-empty list"),
    "targets dotted": ({"target_modules": ["self_attn.q_proj"]}, "target_modules must be"),
    "targets empty": ({"target_modules": []}, "target_modules must be"),
    "target unknown": ({"target_modules": ["q_proj", "k_proj"]}, r"target_modules \['k_proj'\] match no linear"),
    "rslora not bool": ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    "dora": ({"use_dora": True}, "use_dora=True is not supported"),
    "rank pattern": ({"rank_pattern": {"q_proj": 1}}, "rank_pattern=.* is not supported"),
    "alpha pattern": ({"alpha_pattern": {"q_proj": 500000}}, "alpha_pattern=.* is not supported"),
    "layers": ({"layers_to_transform": [0]}, "layers_to_transform=.* is not supported"),
    "layers pattern": ({"layers_pattern": "layers"}, "layers_pattern=.* is not supported"),
    "modules to save": ({"modules_to_save": ["lm_head"]}, "modules_to_save=.* is not supported"),
    "target parameters": ({"target_parameters": ["weight"]}, "target_parameters=.* is not supported"),
    "bias": ({"bias": "all"}, "bias='all' is not supported"),
    "lora bias": ({"lora_bias": True}, "lora_bias=True is not supported"),
    "fan in fan out": ({"fan_in_fan_out": True}, "fan_in_fan_out=True is not supported"),
    "pissa init": ({"init_lora_weights": "pissa"}, "init_lora_weights must be true or false"),
    "task type": ({"task_type": "SEQ_CLS"}, "task_type must be one of"),
    "dropout": ({"lora_dropout": 1.5}, r"lora_dropout must be a number in \[0, 1\)"),
    "peft type": ({"peft_type": "IA3"}, "peft_type must be 'LORA'"),
    "unknown option": ({"lora_magic": 1}, "'lora_magic' is not a LoRA option of PEFT"),
    "config too big": ({"base_model_name_or_path": "x" * MAX_CONFIG_BYTES}, "adapter_config.json is .* bytes, over"),
}


def bad_config(kind: str) -> Adapter:
    edit, _ = BAD_CONFIGS[kind]
    good = adapter(7)
    if not isinstance(edit, dict):
        return Adapter(edit, good.tensors, good.base_fingerprint)
    config = {**good.config, **edit}
    return Adapter({k: v for k, v in config.items() if v is not None}, good.tensors, good.base_fingerprint)


@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_bad_config_is_refused_by_name_and_nothing_is_written(cache, kind):
    before = snapshot(cache.root)
    with pytest.raises(AdapterError, match=BAD_CONFIGS[kind][1]):
        cache.add(bad_config(kind))
    assert snapshot(cache.root) == before


BAD_UPLOADS = {
    "huge weight": (lambda: adapter(b=torch.full((6, 2), 1e38)), AdapterError,
                    r"lora_B.weight holds values up to 1e\+38"),
    "big weight": (lambda: adapter(a=torch.full((2, 4), 2e4)), AdapterError, "over the bound 10000"),
    "huge metadata": (lambda: Adapter(adapter().config, adapter().tensors, "fp0", {"note": "x" * MAX_CONFIG_BYTES}),
                      AdapterError, "metadata is .* bytes, over the 65536-byte limit"),
    "huge metrics": (lambda: {"metrics": {"log": "x" * MAX_FIELD_BYTES}}, CacheError,
                     "metrics is .* bytes, over the 65536-byte limit"),
    "huge label": (lambda: {"label": "é" * (MAX_FIELD_BYTES // 2 + 1)}, CacheError,
                   "label is 65538 bytes, over the 65536-byte limit"),
}


@pytest.mark.parametrize("kind", list(BAD_UPLOADS))
def test_unbounded_values_are_refused_and_nothing_is_written(cache, kind):
    make, error, message = BAD_UPLOADS[kind]
    made = make()
    before = snapshot(cache.root)
    with pytest.raises(error, match=message):
        if isinstance(made, Adapter):
            cache.add(made)
        else:
            cache.add(adapter(8), **made)
    assert snapshot(cache.root) == before


def test_explanations_are_bounded(cache):
    entry = cache.entries()[0]
    before = snapshot(cache.root)
    with pytest.raises(CacheError, match="explanation is .* bytes, over the 65536-byte limit"):
        cache.set_explanation(entry.id, [1.0], ["w"], "x" * (MAX_FIELD_BYTES + 1))
    with pytest.raises(CacheError, match="words is .* bytes, over the 65536-byte limit"):
        cache.set_explanation(entry.id, [1.0] * 4, ["w" * (MAX_FIELD_BYTES // 4)] * 4, "ok")
    assert snapshot(cache.root) == before


BAD_FILES = {
    "not utf-8": (b'{"r": 2, "note": "\xff"}', "adapter_config.json is not UTF-8"),
    "a list": (b"[2, 4]", "adapter_config.json must be a JSON object, got list"),
    "too big": (b" " * (MAX_CONFIG_BYTES + 1) + b"{}", "adapter_config.json is 65539 bytes, over the 65536-byte limit"),
    "rank true": (json.dumps({**adapter().config, "r": True}).encode(), "r must be an integer"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_config_files_raise_adapter_error_on_load_from_cache_and_on_import(cache, tmp_path, kind):
    data, message = BAD_FILES[kind]
    directory = adapter(9).save(tmp_path / "plain")
    (directory / CONFIG_FILE).write_bytes(data)
    with pytest.raises(AdapterError, match=message):
        Adapter.load(directory)

    entry = cache.entries()[0]  # a corrupted cache entry
    good_config = (entry.path / CONFIG_FILE).read_bytes()
    (entry.path / CONFIG_FILE).write_bytes(data)
    with pytest.raises(AdapterError, match=message):
        cache.load_adapter(entry.id)
    (entry.path / CONFIG_FILE).write_bytes(good_config)

    other = PLLMCache(tmp_path / "other", BASE)
    archive = cache.export_entry(entry.id, tmp_path / "good.tar")
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    members[CONFIG_FILE] = data
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    before = snapshot(other.root)
    with pytest.raises(AdapterError, match=f"archive {re.escape(str(tmp_path / 'bad.tar'))}: .*{message}"):
        other.import_entry(tmp_path / "bad.tar")
    assert snapshot(other.root) == before


def test_insert_tells_whether_it_created_the_entry(cache):
    new = adapter(11)
    entry, created = cache.insert(new, label="mine")
    assert created and entry.id == new.content_hash
    again, created = cache.insert(copy.deepcopy(new), label="theirs")
    assert not created and again == entry and again.label == "mine"


def test_import_unpacks_in_the_cache_tmp_area_not_in_tmpdir(cache, tmp_path, monkeypatch):
    archive = cache.export_entry(cache.entries()[0].id, tmp_path / "entry.tar")
    tmpdir = tmp_path / "TMPDIR"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads $TMPDIR again
    assert tempfile.gettempdir() == str(tmpdir)
    target = PLLMCache(tmp_path / "target", BASE)
    stale = target.root / TMP_DIR / "import-stale"  # what a killed import leaves
    stale.mkdir()
    (stale / CONFIG_FILE).write_text("{}")
    seen = []
    real_load = Adapter.load.__func__

    def spy(cls, directory, max_bytes):
        seen.append((Path(directory).parent, sorted(tmpdir.iterdir())))
        return real_load(cls, directory, max_bytes)

    monkeypatch.setattr(Adapter, "load", classmethod(spy))
    assert stale.exists()  # an open while no import runs clears it:
    PLLMCache(target.root)
    assert not stale.exists()
    target.import_entry(archive)
    assert seen == [(target.root / TMP_DIR, [])]
    assert list(tmpdir.iterdir()) == [] and list((target.root / TMP_DIR).iterdir()) == []
    with target._unpack_area() as live:  # a live import's area survives an open
        PLLMCache(target.root)
        assert live.is_dir()
