"""The drift suite: KL(base || checkpoint) and CE on the base model's own texts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from learnforget.assets.models import tiny_tokenizer
from learnforget.errors import ConfigError
from learnforget.eval import drift, drift_refs

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
GEN = {"max_new_tokens": 12, "samples_per_prompt": 2, "temperature": 1.0, "top_p": 1.0}


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.chat_template = CHAT_TEMPLATE
    return t


@pytest.fixture(scope="module")
def base():
    return tiny_model()


@pytest.fixture(scope="module")
def refs(base, tok):
    return drift_refs.generate_references(base, tok, drift_refs.load_prompts(6, seed=1), seed=3, **GEN)


def test_prompt_set_ships_and_subsets_are_seeded():
    everything = drift_refs.load_prompts()
    assert len(everything) >= 60 and len(set(everything)) == len(everything)
    assert all(isinstance(p, str) and 10 < len(p) < 200 for p in everything)
    a, b = drift_refs.load_prompts(16, seed=5), drift_refs.load_prompts(16, seed=5)
    assert a == b and len(set(a)) == 16 and set(a) <= set(everything)
    assert drift_refs.load_prompts(16, seed=6) != a
    assert drift_refs.load_prompts(8, seed=5) == a[:8]  # nested: a smaller subset is a prefix
    with pytest.raises(ConfigError):
        drift_refs.load_prompts(len(everything) + 1)
    with pytest.raises(ConfigError):
        drift_refs.settings_from({"n_prompt": 3})
    assert drift_refs.settings_from({"enabled": True, "n_prompts": 8})["n_prompts"] == 8


def test_references_are_reproducible_and_complete(base, tok, refs, tmp_path):
    again = drift_refs.generate_references(base, tok, drift_refs.load_prompts(6, seed=1), seed=3, **GEN)
    assert again["texts"] == refs["texts"]
    other = drift_refs.generate_references(base, tok, drift_refs.load_prompts(6, seed=1), seed=4, **GEN)
    assert other["texts"] != refs["texts"]
    # a prompt gets the same samples in any subset that contains it
    sub = drift_refs.generate_references(base, tok, drift_refs.load_prompts(6, seed=1)[2:4], seed=3, **GEN)
    assert [t["continuation_ids"] for t in sub["texts"] if t["prompt_index"] == 0] == [
        t["continuation_ids"] for t in refs["texts"] if t["prompt_index"] == 2]
    counts = {v: sum(t["variant"] == v for t in refs["texts"]) for v in drift_refs.VARIANTS}
    assert counts == {"greedy": 6, "sampled": 12, "chat_greedy": 6, "chat_sampled": 12}
    assert refs["chat"] == {"used": True, "reason": None}
    for t in refs["texts"]:
        assert 1 <= len(t["continuation_ids"]) <= GEN["max_new_tokens"]
    chat = next(t for t in refs["texts"] if t["variant"] == "chat_greedy")
    assert tok.decode(chat["prompt_ids"]).startswith("<|user|>\n")
    # greedy = the base model's argmax continuation
    t = refs["texts"][0]
    ids = torch.tensor([t["prompt_ids"] + t["continuation_ids"]])
    with torch.no_grad():
        pred = base(ids).logits[0, len(t["prompt_ids"]) - 1:-1].argmax(-1).tolist()
    assert pred == t["continuation_ids"]
    # JSON round trip, atomic save
    path = tmp_path / "refs" / "r.json"
    drift_refs.save_references(refs, path)
    assert drift_refs.load_references(path) == json.loads(json.dumps(refs))
    assert drift_refs.load_references(tmp_path / "none.json") is None
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_no_chat_template_skips_chat(base):
    r = drift_refs.generate_references(base, tiny_tokenizer(), ["Tell me about rivers."], **GEN)
    assert {t["variant"] for t in r["texts"]} == {"greedy", "sampled"}
    assert r["chat"]["used"] is False and "no chat template" in r["chat"]["reason"]


def test_base_against_itself_is_exactly_zero(base, refs):
    same = drift.drift_scores(base, base, refs, batch_size=4)
    twin = drift.drift_scores(base, copy.deepcopy(base), refs, batch_size=4)
    for result in (same, twin):
        assert set(result["variants"]) == {*drift_refs.VARIANTS, "all"}
        for entry in result["variants"].values():
            assert entry["kl"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}
            assert entry["delta_ce"]["mean"] == 0.0
            assert entry["ce"] == entry["base_ce"]
            assert entry["n_prompts"] == 6
    row = drift.summary_row(same)
    assert row["drift_kl"] == 0.0 and row["drift/chat_sampled/kl"] == 0.0


def test_ce_matches_a_plain_forward(base, refs):
    text = refs["texts"][0]
    ids = torch.tensor([text["prompt_ids"] + text["continuation_ids"]])
    n = len(text["continuation_ids"])
    with torch.no_grad():
        logits = base(ids).logits[0, -n - 1:-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[0, -n:]).item()
    per_text = drift.per_text_scores(base, base, {"texts": [text]})
    assert per_text[0]["n_tokens"] == n
    assert per_text[0]["ce"] / n == pytest.approx(expected, rel=1e-5)


def test_prompt_tuning_rows_are_stripped(base, refs):
    class Prefixed(torch.nn.Module):  # returns 3 extra logit rows, like a prompt-tuning model
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            out = self.m(input_ids=input_ids, attention_mask=attention_mask)
            out.logits = torch.cat([out.logits[:, :3] * 0, out.logits], 1)
            return out

    wrapped = Prefixed(base)
    with pytest.raises(ValueError, match="strip_prefix"):
        drift.drift_scores(base, wrapped, refs)
    assert drift.drift_scores(base, wrapped, refs, strip_prefix=3)[
        "variants"]["all"]["kl"]["mean"] == 0.0


def test_bootstrap_interval():
    vals = [0.1, 0.4, 0.2, 0.9, 0.3, 0.5, 0.05, 0.7]
    lo, hi = drift.bootstrap_ci(vals, n_boot=1000, seed=0)
    assert lo < sum(vals) / len(vals) < hi
    assert (lo, hi) == drift.bootstrap_ci(vals, n_boot=1000, seed=0)
    assert (lo, hi) != drift.bootstrap_ci(vals, n_boot=1000, seed=1)
    lo90, hi90 = drift.bootstrap_ci(vals, n_boot=1000, ci=0.9, seed=0)
    assert lo <= lo90 and hi90 <= hi


def test_drift_grows_with_training_on_unrelated_text(make_cfg, cache_dir, tmp_path):
    """Full finetuning of tiny_llama on Python source: drift on general English prompts is
    > 0 after 2 steps and larger after 6; cached references are reused."""
    from learnforget.assets.models import load_tokenizer
    from learnforget.eval.scoring import load_for_eval
    from learnforget.train.loop import fit, setup

    cfg = make_cfg("model=tiny_llama", "method=full", "train.lr=1e-3",
                   "train.checkpoints.at=[2,6]")
    run = fit(setup(cfg))
    tok = load_tokenizer(str(run / "tokenizer"))
    loads = []

    def load_base():
        loads.append(1)
        return load_for_eval(cfg, None, cache_dir, "cpu")

    settings = {"n_prompts": 8, "max_new_tokens": 16, "samples_per_prompt": 2, "n_boot": 500}
    de = drift.DriftEval(settings, model_id=cfg.model.name, runs_root=tmp_path / "runs",
                         tokenizer=tok, load_base=load_base)
    assert de.path.parent == tmp_path / "runs" / "_base" / cfg.model.name
    assert drift.summary_row(de.score(de.base_model))["drift_kl"] == 0.0
    assert de.path.exists() and de.refs["key"] == de.key and len(loads) == 1
    again = drift.DriftEval(settings, model_id=cfg.model.name, runs_root=tmp_path / "runs",
                            tokenizer=tok, load_base=load_base)
    assert again.refs == de.refs and len(loads) == 1  # cached: no base model needed

    kl, kl_ci, results = [], [], []
    for label in ("step-000002", "step-000006"):
        ckpt = load_for_eval(cfg, run / "checkpoints" / label, cache_dir, "cpu")
        results.append(de.score(ckpt))
        row = drift.summary_row(results[-1])
        kl.append(row["drift_kl"])
        kl_ci.append((row["drift_kl_ci_low"], row["drift_kl_ci_high"]))
        assert row["drift_kl_ci_low"] <= row["drift_kl"] <= row["drift_kl_ci_high"]
        assert row["drift/greedy/kl"] > 0 and row["drift/sampled/kl"] > 0
    assert 0 < kl[0] < kl[1], kl
    assert kl_ci[0][1] < kl_ci[1][0], kl_ci  # clearly separated, not just ordered
    diff = drift.paired_difference(results[1], results[0])
    assert diff["ci_low"] > 0 and diff["a_larger_share"] == 1.0


def test_row_sampler_draws_from_the_softmax_and_respects_top_p():
    """Gumbel-max with a generator per row: the argmax of the noised scores is distributed as
    softmax(scores / temperature), restricted to the top-p nucleus; rows without a generator
    stay greedy."""
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    n = 20000
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    draws = drift_refs._RowSampler(gens, 1.0, 1.0)(None, scores.expand(n, -1)).argmax(-1)
    freq = torch.bincount(draws, minlength=5).double() / n
    expected = torch.softmax(scores[0].double(), -1)
    assert torch.allclose(freq, expected, atol=4 * (expected * (1 - expected) / n).sqrt().max())
    hot = drift_refs._RowSampler(gens[:2000], 0.5, 1.0)(None, scores.expand(2000, -1)).argmax(-1)
    assert (hot == 0).double().mean() > expected[0] + 0.1  # a lower temperature sharpens
    nucleus = drift_refs._RowSampler(gens[:2000], 1.0, 0.8)(None, scores.expand(2000, -1)).argmax(-1)
    assert set(nucleus.tolist()) == {0, 1}  # p = .64, .24, .09, ...: the top 2 reach 0.8
    mixed = drift_refs._RowSampler([None, torch.Generator().manual_seed(0)], 1.0, 1.0)(
        None, scores.expand(2, -1))
    assert torch.equal(mixed[0], scores[0])
    again = drift_refs._RowSampler([torch.Generator().manual_seed(0)], 1.0, 1.0)(None, scores)
    assert torch.equal(again[0], mixed[1])  # a row's draw depends on its generator alone


def test_base_log_probs_are_cached_between_checkpoints(base, refs):
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            calls.append(1)
            return self.m(**kw)

    counted = Counting(base)
    other = tiny_model(seed=1)
    plain = drift.drift_scores(counted, other, refs, batch_size=4)
    n_batches = len(calls)
    cache: dict = {}
    first = drift.drift_scores(counted, other, refs, batch_size=4, base_cache=cache)
    second = drift.drift_scores(counted, other, refs, batch_size=4, base_cache=cache)
    assert len(calls) == 3 * n_batches - n_batches  # the second call ran no base forward
    for result in (first, second):
        assert result["variants"] == plain["variants"]
    assert 0 < cache["bytes"] <= drift.BASE_CACHE_BYTES
