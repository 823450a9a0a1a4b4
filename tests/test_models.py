import json
import os

import pytest
import torch

from xpert_fl import models
from xpert_fl.models import LoadOptions, ModelLoadError, load_model


def test_embedded_model_loads_with_chat_template(base):
    assert base.source == str(models.converted_dir(models.DEFAULT_SPEC))
    text = base.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nName a colour.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert base.tokenizer.pad_token is not None


def test_forward_gives_finite_logits_over_vocabulary(base):
    batch = base.tokenizer(["Hello there", "A second, longer line of text."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = base.model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert logits.shape[-1] == len(base.tokenizer) == 49152
    assert torch.isfinite(logits).all()


def test_converted_cache_is_a_plain_checkpoint(base):
    path = models.converted_dir(models.DEFAULT_SPEC)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert list(path.glob("*.safetensors"))
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_fingerprint_is_stable_and_sensitive(base):
    fp = models.model_fingerprint(base.model)
    assert fp == base.fingerprint
    changed = load_model()
    with torch.no_grad():
        next(changed.model.parameters()).view(-1)[0] += 1.0
    assert models.model_fingerprint(changed.model) != fp


def test_unknown_spec_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model")


def _no_hub_requests(monkeypatch):
    """Fail the test if transformers is asked to fetch anything (offline, that is a minute of retries)."""
    def fetch(*args, **kwargs):
        pytest.fail("transformers was asked to load from the hub")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", fetch)


def test_an_unreachable_hub_fails_at_once_naming_the_spec(monkeypatch):
    for name in (*models.OFFLINE_ENVS, "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)

    def no_network(address, timeout):
        assert timeout == models.HUB_CHECK_SECONDS
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(models.socket, "create_connection", no_network)
    _no_hub_requests(monkeypatch)
    with pytest.raises(ModelLoadError, match=r"'no-such-org/no-such-model' is not .* HF cache, and the Hugging "
                                             r"Face hub https://\S+ cannot be reached \(\[Errno -2\]"):
        load_model("no-such-org/no-such-model")


def test_offline_a_hub_id_loads_from_its_snapshot_in_the_hf_cache(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_hub_requests(monkeypatch)
    repo = tmp_path / "models--some-org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="'some-org/tiny': its snapshot .* has no config.json, and HF_HUB_OFF"):
        models.resolve("some-org/tiny")
    (snapshot / "config.json").write_text("{}")
    assert models.resolve("some-org/tiny") == str(snapshot)
    with pytest.raises(ModelLoadError, match="'other-org/tiny' is not .* HF cache, and HF_HUB_OFFLINE is set"):
        models.resolve("other-org/tiny")


def test_local_path_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_local_checkpoint_directory_loads(base, tmp_path):
    base.model.save_pretrained(tmp_path)
    base.tokenizer.save_pretrained(tmp_path)
    other = load_model(str(tmp_path))
    assert other.fingerprint == base.fingerprint


def test_corrupt_converted_checkpoint_names_remedy(base, tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    fake = models.converted_dir(models.DEFAULT_SPEC)
    fake.mkdir(parents=True)
    (fake / "model.safetensors").write_bytes(b"truncated")
    (fake / "xpert_manifest.json").write_text(json.dumps({"files": {"model.safetensors": "0" * 64}}))
    with pytest.raises(ModelLoadError, match="--reconvert"):
        load_model()


def test_missing_embedded_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(
        models.EMBEDDED, "ghost", models.EmbeddedModel("no_such_pkg_xyz", "ghost.gguf", "pip install ghost")
    )
    with pytest.raises(ModelLoadError, match="pip install ghost"):
        load_model("ghost")
    assert not (tmp_path / "models" / "ghost").exists()


def test_options_validate_dtype():
    with pytest.raises(ValueError, match="unknown dtype"):
        LoadOptions(dtype="float7").torch_dtype()


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_root() == tmp_path / "xpert-fl"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "x"))
    assert models.cache_root() == tmp_path / "x"
    assert os.fspath(models.converted_dir("a")).endswith(os.path.join("x", "models", "a"))


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash mid-conversion")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        models.convert_embedded(models.DEFAULT_SPEC)
    assert list((tmp_path / "models").iterdir()) == []
