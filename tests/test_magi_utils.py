"""magi_utils: the MagiAttention backend choice and the checks a model must pass before CP training."""

import sys
import types

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

import magi_portable
import magi_utils


def tiny_llama(**overrides):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, **overrides)
    return LlamaForCausalLM(config)


def test_portable_backend_can_be_forced():
    assert magi_utils.load_magi_api("portable") is magi_portable


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"^MAGI_ATTENTION_BACKEND='flash': use auto, magi or portable\.$"):
        magi_utils.load_magi_api("flash")


def test_auto_backend_takes_the_real_library_when_importable(monkeypatch):
    real = types.ModuleType("magi_attention.api")
    monkeypatch.setitem(sys.modules, "magi_attention", types.ModuleType("magi_attention"))
    monkeypatch.setitem(sys.modules, "magi_attention.api", real)
    assert magi_utils.load_magi_api("auto") is real
    assert magi_utils.load_magi_api("magi") is real


def test_auto_backend_falls_back_to_magi_portable(monkeypatch):
    # PyPI's placeholder package: magi_attention imports, magi_attention.api does not.
    monkeypatch.setitem(sys.modules, "magi_attention", types.ModuleType("magi_attention"))
    monkeypatch.setitem(sys.modules, "magi_attention.api", None)
    assert magi_utils.load_magi_api("auto") is magi_portable


def test_a_llama_takes_magi_attention():
    magi_utils.check_model_takes_magi_attention(tiny_llama(), "Magi_Attention")


def test_a_model_without_the_attention_registry_is_refused():
    model = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=64))  # 4.51 and 5 alike
    with pytest.raises(ValueError, match="^BloomForCausalLM cannot take the registered attention function"):
        magi_utils.check_model_takes_magi_attention(model, "Magi_Attention")


def test_heads_that_grouped_query_attention_cannot_split_are_refused():
    model = tiny_llama()
    model.config.num_key_value_heads = 3
    with pytest.raises(ValueError, match=r"^num_attention_heads \(4\) is not a multiple of num_key_value_heads \(3\)"):
        magi_utils.check_model_takes_magi_attention(model, "Magi_Attention")


@pytest.mark.skipif(not magi_utils.MODEL_BUILDS_ITS_OWN_MASK, reason="transformers 5's models build no mask for it")
def test_skip_causal_mask_builds_no_mask():
    model = tiny_llama(attn_implementation="eager")  # eager attention always takes a [batch, 1, seq, seq] mask
    decoder = model.get_decoder()
    hidden = decoder.embed_tokens.weight[None, :3]
    assert decoder._update_causal_mask(None, hidden, torch.arange(3), None, False).dim() == 4
    magi_utils.skip_causal_mask(model)
    assert decoder._update_causal_mask(None, hidden, torch.arange(3), None, False) is None
