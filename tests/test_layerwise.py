"""Layer-by-layer forward (paper §5.1) equals the normal forward of the embedded model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from xpert_fl.layerwise import LayerwiseRunner, UnsupportedModelError
from xpert_fl.models import ModelLoadError

PROMPTS = ["Hi!", "Describe the sea in one short, calm sentence, please.", "What is two plus two?"]


@pytest.fixture(scope="module")
def batch(base):
    tok = base.tokenizer
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    mask = enc["attention_mask"]
    assert len(set(mask.sum(-1).tolist())) == 3  # three different lengths: real left padding
    return enc["input_ids"], mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module")
def reference(base, batch):
    ids, mask, pos = batch
    with torch.no_grad():
        hidden = base.model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        probs = torch.softmax(base.model.lm_head(hidden[:, -1]).float(), dim=-1)
    return hidden, probs


@pytest.fixture(scope="module")
def layerwise(base, batch):
    """Runs the padded batch plus its longest row alone (no mask, default positions) in one pass."""
    runner = LayerwiseRunner(base.source)
    read = []  # parameters held per checkpoint read: never more than one layer's worth
    plain_read = runner._tensors
    runner._tensors = lambda prefix: read.append(plain_read(prefix)) or read[-1]
    ids, mask, pos = batch
    longest = int(mask.sum(-1).argmax())
    padded, alone = runner.hidden_states_batches([batch, (ids[longest : longest + 1], None, None)])
    return runner, padded, alone, longest, [sum(t.numel() for t in r.values()) for r in read]


def test_layerwise_equals_full_forward(base, batch, reference, layerwise):
    runner, padded, alone, longest, _ = layerwise
    hidden, probs = reference
    mask = batch[1].bool()
    assert padded.shape == hidden.shape
    torch.testing.assert_close(padded[mask], hidden[mask], atol=1e-4, rtol=0)  # every real position
    torch.testing.assert_close(padded[:, -1], hidden[:, -1], atol=1e-4, rtol=0)
    torch.testing.assert_close(runner.next_token_probs(padded[:, -1]), probs, atol=1e-4, rtol=0)
    torch.testing.assert_close(alone[0, -1], hidden[longest, -1], atol=1e-4, rtol=0)
    assert 0 < runner.stats["load_seconds"] < runner.stats["total_seconds"]


def test_layerwise_stops_at_an_intermediate_layer(base, batch, layerwise):
    """``layers=k`` equals ``output_hidden_states[k]`` (the residual stream, no final norm)."""
    runner = layerwise[0]
    ids, mask, pos = batch
    with torch.no_grad():
        full = base.model.model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    got = runner.hidden_states(ids, mask, pos, layers=5)
    torch.testing.assert_close(got[mask.bool()], full.hidden_states[5][mask.bool()], atol=1e-4, rtol=0)


def test_layerwise_never_holds_the_whole_model(base, layerwise):
    *_, read_sizes = layerwise
    total = base.num_parameters()
    assert len(read_sizes) == base.model.config.num_hidden_layers + 1  # each layer once, then the final norm
    assert max(read_sizes) < total / 20


def test_fingerprint_matches_loaded_model(base, layerwise):
    assert layerwise[0].fingerprint() == base.fingerprint


def test_non_llama_checkpoint_is_a_clear_error(tmp_path):
    AutoConfig.for_model("gpt2").save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"supports model types \['llama'\].*'gpt2'"):
        LayerwiseRunner(str(tmp_path))


def test_checkpoint_without_safetensors_is_a_clear_error(tmp_path):
    AutoConfig.for_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        LayerwiseRunner(str(tmp_path))
