"""eval.head=fp32 (learnforget.eval.head): every scored log-likelihood (lm-eval's HFLM, the
shared-context backend, cross-entropy, drift) takes the final hidden state through an fp32 copy of
the LM head and an fp32 log-softmax, whatever the body's dtype; checked against float64
log-softmax computed independently from the same hidden states and head weight. The key changes
only where the head changes scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from learnforget.assets.models import tiny_tokenizer
from learnforget.data.packing import Example
from learnforget.errors import ConfigError
from learnforget.eval import drift
from learnforget.eval.crossentropy import mean_cross_entropy
from learnforget.eval.fast_lm import SharedContextLM
from learnforget.eval.head import Fp32Head, apply_head_policy, head_record
from learnforget.eval.scoring import prepare_for_scoring
from learnforget.eval.suite import body_dtype, eval_key, head_note, head_policy

BF16_BODY = OmegaConf.create({"precision": "bf16", "head": "fp32"})
BF16_BODY_HEAD = OmegaConf.create({"precision": "bf16", "head": "model"})

# (context, continuation) pairs; the first three share a context, as a multiple-choice question
PAIRS = [("The cat sat on the", " mat and slept."), ("The cat sat on the", " roof."),
         ("The cat sat on the", " keyboard all day long"),
         ("def add(a, b):\n", "    return a + b\n"), ("Once upon a time", " there was a king")]


def _model(seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    """A tiny random Llama whose logits have the spread of a trained model's (std ~6,
    extremes near 30): the LM head weight is scaled, so bf16 rounding of the logits matters.
    `tied`: the head is the input embedding (SmolLM2's tie_word_embeddings)."""
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, tie_word_embeddings=tied)).eval()
    assert (m.lm_head.weight is m.model.embed_tokens.weight) is tied
    with torch.no_grad():
        m.lm_head.weight.mul_(40.0)
    return m


def _reference_lls(model, head_weight: torch.Tensor, token_pairs) -> list[float]:
    """float64 log-softmax of (final hidden state) x (head weight), summed over each
    continuation: the body's own last_hidden_state, nothing of learnforget.eval.head."""
    out = []
    w = head_weight.double()
    for ctx, cont in token_pairs:
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            h = model.model(input_ids=ids).last_hidden_state[0].double()
        logp = torch.log_softmax(h @ w.T, dim=-1)
        n = len(cont)
        rows = torch.arange(len(ctx) - 1, len(ctx) - 1 + n)
        out.append(float(logp[rows, torch.tensor(cont)].sum()))
    return out


class Float64Head(torch.nn.Module):
    """The reference output layer: the hidden state it is given and the weight as loaded, in
    float64 (so every log-softmax after it is float64 too)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.w = weight.detach().double()

    def forward(self, hidden):
        return hidden.double() @ self.w.T


def _lm_lls(cls, ev, *, reference: bool = False, tied: bool = False) -> list[float]:
    """Per-request log-likelihoods of PAIRS through lm-eval's loglikelihood, the body in bf16;
    `reference`: the output layer replaced by Float64Head (same body, same hidden states)."""
    model = _model(tied=tied)
    w32 = model.lm_head.weight.detach().clone()  # the weight as loaded (fp32)
    prepare_for_scoring(model, ev)
    assert next(model.model.parameters()).dtype == torch.bfloat16  # the body in bf16
    if reference:
        model.set_output_embeddings(Float64Head(w32 if ev.head == "fp32" else
                                                w32.to(torch.bfloat16)))
    lm = cls(pretrained=model, tokenizer=tiny_tokenizer(), batch_size=4)
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
            for i, p in enumerate(PAIRS)]
    got = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    if cls is SharedContextLM:
        assert not lm._sharing_failed
    if cls is HFLM and reference:  # the body's own last_hidden_state, one request at a time,
        # gives the same (within what a padded bf16 batch changes in the body)
        token_pairs = [lm._encode_pair(c, x) for c, x in PAIRS]
        plain = _reference_lls(model, model.lm_head.w, token_pairs)
        assert max(abs(a - b) for a, b in zip(got, plain, strict=True)) < 1e-3
    return got


@pytest.mark.parametrize("cls", [HFLM, SharedContextLM])
def test_fp32_body_scores_are_bit_identical_under_either_head(cls):
    """eval.precision=fp32 (or an fp32 model): the fp32 head is the model's own computation,
    so results (and cached results, whose key does not change) stay exactly as they were."""
    lls = {}
    for head in ("fp32", "model"):
        model = _model()
        apply_head_policy(model, OmegaConf.create({"head": head}))
        assert isinstance(model.lm_head, Fp32Head) is (head == "fp32")
        lm = cls(pretrained=model, tokenizer=tiny_tokenizer(), batch_size=4)
        reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                for i, p in enumerate(PAIRS)]
        lls[head] = lm.loglikelihood(reqs, disable_tqdm=True)
    assert lls["fp32"] == lls["model"]


@pytest.mark.parametrize(("cls", "tied"), [(HFLM, False), (SharedContextLM, False),
                                           (HFLM, True)])
def test_fp32_head_matches_float64_reference_and_bf16_head_does_not(cls, tied):
    # tied: HFLM calls transformers' tie_weights on the model it gets, after the head is in
    fp32 = _lm_lls(cls, BF16_BODY, tied=tied)
    ref = _lm_lls(cls, BF16_BODY, reference=True, tied=tied)
    err_fp32 = max(abs(a - b) for a, b in zip(fp32, ref, strict=True))
    bf16 = _lm_lls(cls, BF16_BODY_HEAD, tied=tied)  # the head in the body's bf16 (eval.head=model)
    err_bf16 = max(abs(a - b) for a, b in zip(bf16, ref, strict=True))
    assert err_fp32 < 2e-4, (err_fp32, err_bf16)  # fp32 rounding of sums near -150
    assert err_bf16 > 100 * err_fp32 and err_bf16 > 1e-2, (err_fp32, err_bf16)


@pytest.mark.parametrize("ev", [BF16_BODY, BF16_BODY_HEAD], ids=["fp32_head", "bf16_head"])
def test_cross_entropy_and_drift_take_the_fp32_head(ev):
    model = _model()
    w32 = model.lm_head.weight.detach().clone()
    prepare_for_scoring(model, ev)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 2048, (n,), generator=gen).tolist() for n in (24, 17, 30)]
    examples = [Example(input_ids=s, labels=s) for s in seqs]
    ce, n = mean_cross_entropy(model, examples, batch_size=2, pad_id=0)
    ref_ce = [-x for x in _reference_lls(model, w32, [(s[:1], s[1:]) for s in seqs])]
    assert n == sum(len(s) - 1 for s in seqs)
    if ev.head == "model":  # the bf16 head is measurably off (so the check below can fail)
        assert abs(ce - sum(ref_ce) / n) > 1e-3
        return
    assert ce == pytest.approx(sum(ref_ce) / n, abs=2e-5)
    texts = [{"variant": "greedy", "prompt_index": i, "prompt_ids": s[:5],
              "continuation_ids": s[5:]} for i, s in enumerate(seqs)]
    per_text = drift.per_text_scores(model, model, {"texts": texts}, batch_size=2)
    ref = _reference_lls(model, w32, [(s[:5], s[5:]) for s in seqs])
    for t, r in zip(per_text, ref, strict=True):
        assert t["ce"] == pytest.approx(-r, abs=2e-4)
        assert t["kl"] == 0.0


def test_head_copy_install_and_record():
    model = _model()
    original = model.lm_head
    w32 = original.weight.detach().clone()
    prepare_for_scoring(model, BF16_BODY)
    head = model.get_output_embeddings()
    assert isinstance(head, Fp32Head) and head.head is original
    assert head._weight.dtype == torch.float32 and torch.equal(head._weight, w32)  # not rounded
    assert original.weight.dtype == torch.bfloat16  # the replaced layer was cast with the body
    # the model's parameters keep their names (the head's weight is the Fp32Head's too)
    assert dict(model.named_parameters())["lm_head.weight"] is original.weight
    assert prepare_for_scoring(model, BF16_BODY).get_output_embeddings() is head  # idempotent
    assert head_record(model, BF16_BODY) == {"policy": "fp32", "logits": "float32",
                                             "weight": "float32"}
    apply_head_policy(model, BF16_BODY_HEAD)  # `model` puts the model's own layer back
    assert model.get_output_embeddings() is original
    assert head_record(model, BF16_BODY_HEAD) == {"policy": "model", "logits": "bfloat16",
                                                  "weight": "bfloat16"}


def test_peft_model_gets_the_head_under_its_adapters():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    apply_head_policy(peft_model, BF16_BODY)
    assert isinstance(peft_model.get_base_model().lm_head, Fp32Head)
    assert head_record(peft_model, BF16_BODY)["logits"] == "float32"


def test_bad_head_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^eval.head='fp16' is unknown \(expected one of: "
                                          r"fp32, model\)$"):
        head_policy(OmegaConf.create({"head": "fp16"}))
    assert head_policy(OmegaConf.create({})) == "fp32"
    model = _model()
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ConfigError, match="needs a plain nn.Linear output layer, this model's "
                                          "is Sequential: use eval.head=model"):
        apply_head_policy(model, BF16_BODY)


# keys of {"name": "pinned", "seed": 1, "precision": p, "batch_size": 8} with no tasks, as the
# code before eval.head computed them (git 2725adf, learnforget.eval.suite.eval_key)
OLD_KEYS = {"model": "7e9911b8090d06d4019a8be1286d5522e5e12e184366d550bd7595a5c0eba34f",
            "fp32": "6c827842bc25ab8cb430c58cd4e988683f2c2559345385fea24df612af88f1f1",
            "bf16": "a4f6a7a71141ee5466f17d83ee56296c053cb7b251c489470cc8a43cfda67a7e"}


@pytest.mark.parametrize("head", [None, "fp32", "model"])
def test_key_changes_only_where_the_head_changes_scores(head):
    where = Path("/nonexistent")

    def key(precision: str, dtype: str) -> str:
        ev = {"name": "pinned", "seed": 1, "precision": precision, "batch_size": 8}
        return eval_key(OmegaConf.create(ev if head is None else {**ev, "head": head}), [],
                        where, body_dtype=dtype)

    # fp32 bodies: the head is fp32 either way, the old keys (and cached results) stay valid
    assert key("fp32", "float32") == OLD_KEYS["fp32"]
    assert key("model", "float32") == OLD_KEYS["model"]
    fp32_head = head in (None, "fp32")  # fp32 is the default
    # bf16 bodies: an fp32 head changes the scores, so the key; `model` is the old behaviour
    assert (key("bf16", "bfloat16") == OLD_KEYS["bf16"]) is not fp32_head
    assert (key("model", "bfloat16") == OLD_KEYS["model"]) is not fp32_head


def test_body_dtype_follows_precision_model_and_qlora():
    run = OmegaConf.create({"model": {"dtype": "bfloat16"}, "method": {"name": "full"}})
    assert body_dtype(OmegaConf.create({"precision": "model"}), run) == "bfloat16"
    assert body_dtype(OmegaConf.create({"precision": "fp32"}), run) == "float32"
    qlora = OmegaConf.merge(run, {"method": {"name": "qlora", "compute_dtype": "float32",
                                                  "quant_type": "nf4", "double_quant": True}})
    assert body_dtype(OmegaConf.create({"precision": "model"}), qlora) == "float32"
    fp32_run = OmegaConf.merge(run, {"model": {"dtype": "float32"}})
    assert body_dtype(OmegaConf.create({"precision": "bf16"}), fp32_run) == "bfloat16"


def test_head_note_only_where_the_head_changes_scores():
    bf16_run = OmegaConf.create({"model": {"dtype": "bfloat16"}, "method": {"name": "lora"}})
    fp32_run = OmegaConf.merge(bf16_run, {"model": {"dtype": "float32"}})
    model_precision = OmegaConf.create({"precision": "model", "head": "fp32"})
    assert "fp32 LM head and log-softmax on a bfloat16 body" in head_note(model_precision,
                                                                         bf16_run)
    assert head_note(model_precision, fp32_run) is None
    assert head_note(OmegaConf.merge(model_precision, {"head": "model"}), bf16_run) is None
    assert head_note(OmegaConf.create({"precision": "bf16"}), fp32_run) is not None
