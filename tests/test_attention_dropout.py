"""train.attention_dropout (the paper's regulariser arms, sec. 4.5): dropout on the attention
probabilities in training mode only, checked against the eval-mode probabilities of the same
model (torch's inverted dropout: kept entries scaled by 1 / (1 - p)); bad values; the run
identity; a training run records it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from learnforget.config import config_hash, run_name, validate
from learnforget.errors import ConfigError
from learnforget.train.regularise import set_attention_dropout


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64)
    cfg._attn_implementation = "eager"  # returns the attention probabilities after dropout
    return LlamaForCausalLM(cfg)


def _probs(model, train: bool, seed: int = 1):
    ids = torch.arange(3, 35).reshape(1, 32)
    model.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    return out.logits, out.attentions


def test_dropout_acts_on_attention_probabilities_in_training_only():
    model = _llama()
    logits0, probs0 = _probs(model, train=False)
    train0, _ = _probs(model, train=True)
    assert torch.equal(train0, logits0)  # the model's own value: 0.0, no dropout anywhere
    notes = set_attention_dropout(model, 0.1)
    assert len(notes) == 1 and "2 attention modules" in notes[0] and "0.0" in notes[0]
    assert model.config.attention_dropout == 0.1
    logits_eval, probs_eval = _probs(model, train=False)
    assert torch.equal(logits_eval, logits0)  # eval mode: no dropout
    for a, b in zip(probs_eval, probs0, strict=True):
        assert torch.equal(a, b)
    logits_train, probs_train = _probs(model, train=True)
    assert not torch.allclose(logits_train, logits0)
    # Layer 0 sees the same hidden states in both modes: its kept probabilities are the eval
    # ones / (1 - p), the others are 0; the dropped share of the causal (non-zero) entries ~ p.
    p_eval, p_train = probs0[0], probs_train[0]
    causal = p_eval > 0
    kept = p_train != 0
    assert torch.allclose(p_train[kept], p_eval[kept] / 0.9, rtol=1e-5, atol=1e-7)
    dropped = (causal & ~kept).sum().item() / causal.sum().item()
    n = causal.sum().item()  # 4 heads x 528 causal entries: sd of the share ~0.0065
    assert abs(dropped - 0.1) < 4 * (0.1 * 0.9 / n) ** 0.5, dropped


def test_none_changes_nothing_and_bad_values_are_config_errors():
    model = _llama()
    assert set_attention_dropout(model, None) == []
    assert all(m.attention_dropout == 0.0 for m in model.modules() if hasattr(m, "attention_dropout"))
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(ConfigError, match=r"train.attention_dropout must be null or a number in \[0, 1\)"):
            set_attention_dropout(model, bad)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ConfigError, match="model type 'gpt2' has none"):
        set_attention_dropout(gpt2, 0.1)


def test_config_validation_and_identity(make_cfg):
    base = make_cfg()
    validate(base)
    assert run_name(make_cfg("train.attention_dropout=null")) == run_name(base)
    with_dropout = make_cfg("train.attention_dropout=0.1")
    validate(with_dropout)
    assert config_hash(with_dropout) != config_hash(base)
    assert config_hash(make_cfg("train.attention_dropout=0.05")) != config_hash(with_dropout)
    with pytest.raises(ConfigError, match=r"train.attention_dropout must be null .* got 1.5"):
        validate(make_cfg("train.attention_dropout=1.5"))


def test_a_training_run_records_the_dropout(make_cfg):
    from learnforget.train.loop import train

    out = train(make_cfg("method=full", "train.attention_dropout=0.1", "train.lr=1e-3"))
    record = json.loads((out / "run.json").read_text())
    notes = record["train"]["notes"]
    assert any(n.startswith("train.attention_dropout=0.1: dropout on the attention") for n in notes)
    saved = json.loads(next(out.glob("checkpoints/*/config.json")).read_text())
    assert saved["attention_dropout"] == 0.1
