"""The shared-context backend (learnforget.eval.fast_lm, lm-eval model "lf-hf-shared") gives the
same per-item log-likelihoods as lm-eval's own HFLM (within 1e-4) and the same metrics, on
every multiple-choice format, through lm-eval's own evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from transformers import LlamaConfig, LlamaForCausalLM

from learnforget.assets import benchmarks as bd
from learnforget.assets.models import tiny_tokenizer
from learnforget.eval.fast_lm import SharedContextLM
from learnforget.eval.lm_eval_run import evaluate
from learnforget.eval.task_specs import TaskSpec
from learnforget.eval.task_yaml import write_task_dir

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512)).eval()


def test_registered_with_lm_eval():
    assert get_model("lf-hf-shared") is SharedContextLM


def test_same_loglikelihoods_as_hflm(model, tmp_path):
    specs = [TaskSpec(f"lf_{k}", k, FIX / "benchmarks" / bd.file_name(k))
             for k in ("hellaswag", "arc_challenge", "arc_easy", "winogrande", "piqa")]
    specs.append(TaskSpec("lf_mc", "mc_json", FIX / "eval" / "mc_json.jsonl"))
    include = write_task_dir(specs, tmp_path / "t")
    tok = tiny_tokenizer()
    runs = {}
    groups = []
    for name, cls in (("hf", HFLM), ("shared", SharedContextLM)):
        lm = cls(pretrained=model, tokenizer=tok, batch_size=4)
        if name == "shared":
            lm._score_packed = lambda qs, f=lm._score_packed: groups.extend(
                len(conts) for _, conts in qs) or f(qs)
        runs[name] = evaluate(lm, specs, include, batch_size=4, seed=1234, items=True)
    assert not lm._sharing_failed
    # at least one group per question whose choices share the context (all but winogrande,
    # whose choices are different contexts that only share tokens by chance)
    n_shared = sum(len(r["items"]["doc_id"]) for n, r in runs["hf"].items() if n != "lf_winogrande")
    assert len(groups) >= n_shared and min(groups) >= 2
    for spec in specs:
        a, b = runs["hf"][spec.name], runs["shared"][spec.name]
        assert a["items"]["doc_id"] == b["items"]["doc_id"]
        flat_a = [x for row in a["items"]["lls"] for x in row]
        flat_b = [x for row in b["items"]["lls"] for x in row]
        assert len(flat_a) == len(flat_b) > 0
        assert max(abs(x - y) for x, y in zip(flat_a, flat_b, strict=True)) < 1e-4, spec.name
        assert a["metrics"] == b["metrics"], spec.name


def test_unmerged_lora_adapter_gives_the_same_loglikelihoods(model, tmp_path):
    """Checkpoints are scored as unmerged PeftModels: the shared cache goes through peft."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "up_proj"]))
    peft_model.eval()
    spec = TaskSpec("lf_arc", "arc_challenge", FIX / "benchmarks" / bd.file_name("arc_challenge"))
    include = write_task_dir([spec], tmp_path / "t")
    tok = tiny_tokenizer()
    lls = {}
    for cls in (HFLM, SharedContextLM):
        lm = cls(pretrained=peft_model, tokenizer=tok, batch_size=4)
        res = evaluate(lm, [spec], include, batch_size=4, seed=1234, items=True)[spec.name]
        lls[cls.__name__] = [x for row in res["items"]["lls"] for x in row]
    assert not lm._sharing_failed
    assert max(abs(a - b) for a, b in zip(lls["HFLM"], lls["SharedContextLM"],
                                          strict=True)) < 1e-4
    peft_model.unload()  # the module fixture's model without the adapter layers again


def _tiny(kind: str):
    """A tiny random causal LM: Llama (sdpa or eager attention, or a forward without
    `logits_to_keep`) or GPT-2 (learned positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    class FullLogits(LlamaForCausalLM):
        """A forward without `logits_to_keep`: the backend gathers the scored positions."""

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kw):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, **kw)

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_embd=64, n_layer=2, n_head=4,
                                          n_positions=512, bos_token_id=0,
                                          eos_token_id=0)).eval()
    return (FullLogits if kind == "llama_full_logits" else LlamaForCausalLM)(LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512,
        attn_implementation="eager" if kind == "llama_eager" else "sdpa")).eval()


def _requests(model) -> list:
    """Hand-made (key, context, continuation) requests: questions of different context lengths
    with continuations of different lengths, one-token continuations, a greedy continuation
    (the model's own argmax tokens), a lone context (no sharing) and a context HFLM truncates."""
    g = torch.Generator().manual_seed(3)

    def toks(n: int) -> list[int]:
        return torch.randint(3, 2000, (n,), generator=g).tolist()

    questions = [(toks(n), [toks(m) for m in lens]) for n, lens in (
        (5, (3, 1, 7, 2)), (40, (1, 1, 1, 1)), (1, (4, 9)), (17, (12, 5, 5)), (90, (2, 30)),
        (8, (6, 6, 6, 6, 6)), (23, (1, 15)))]
    ctx = toks(11)
    greedy = model.generate(torch.tensor([ctx]), max_new_tokens=4, do_sample=False,
                            pad_token_id=0)[0, len(ctx):].tolist()
    questions.append((ctx, [greedy, toks(4), greedy[:1]]))
    questions += [(toks(9), [toks(3)]), (toks(600), [toks(4), toks(2)])]
    return [((f"q{q}", f"c{c}"), ctx, cont) for q, (ctx, conts) in enumerate(questions)
            for c, cont in enumerate(conts)]


@pytest.mark.parametrize("kind", ["llama_sdpa", "llama_eager", "llama_full_logits", "gpt2",
                                  "lora"])
def test_packed_batches_give_hflm_values(kind):
    """Several questions per forward pass (different context and continuation lengths,
    one-token continuations) give HFLM's log-likelihoods and greedy flags; lone contexts and
    sequences HFLM truncates go to HFLM's code; the token budget bounds every batch."""
    net = _tiny("llama_sdpa" if kind == "lora" else kind)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        net = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                             target_modules=["q_proj", "v_proj", "up_proj"]))
        net.eval()
    assert net.config._attn_implementation == ("eager" if kind == "llama_eager" else "sdpa")
    reqs = _requests(net.get_base_model() if kind == "lora" else net)
    tok = tiny_tokenizer()
    ref = HFLM(pretrained=net, tokenizer=tok, batch_size=4)._loglikelihood_tokens(reqs)
    lm = SharedContextLM(pretrained=net, tokenizer=tok, batch_size=4)
    assert ("logits_to_keep" in lm._base_forward_params()) == (kind != "llama_full_logits")
    batches: list[list[int]] = []
    lm._score_packed = lambda qs, f=lm._score_packed: batches.append(
        [len(c) + sum(len(x) - 1 for x in k) for c, k in qs]) or f(qs)
    fell_back: list[int] = []
    hf_call = HFLM._loglikelihood_tokens
    lm_cls = type(lm)
    try:
        HFLM._loglikelihood_tokens = lambda self, r, **kw: fell_back.append(len(r)) or hf_call(
            self, r, **kw)
        got = lm_cls._loglikelihood_tokens(lm, reqs)
    finally:
        HFLM._loglikelihood_tokens = hf_call
    assert not lm._sharing_failed
    assert fell_back == [3]  # the lone context and the two truncated requests
    assert max(len(b) for b in batches) > 1  # several questions per forward
    assert sum(len(b) for b in batches) == 8
    longest = max(len(c) + len(k) - 1 for _, c, k in reqs if len(c) + len(k) <= 513 and
                  len(c) != 9)
    assert all(max(b) * len(b) <= 4 * longest or len(b) == 1 for b in batches)
    assert len(got) == len(ref) == len(reqs)
    for (a_ll, a_g), (b_ll, b_g) in zip(ref, got, strict=True):
        assert abs(a_ll - b_ll) < 1e-4
        assert a_g == b_g
    assert any(g for _, g in ref)  # the greedy continuation is flagged in both


def test_model_without_packed_form_falls_back_to_hflm():
    """A model whose forward rejects the 4D mask: the first packed batch fails, the backend
    marks sharing as failed and HFLM's code scores every request, with HFLM's values."""

    class NoMasks(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kw):
            if attention_mask is not None and attention_mask.ndim == 4:
                raise ValueError("no 4D attention masks")
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, **kw)

    torch.manual_seed(0)
    net = NoMasks(LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=256,
                              num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=512)).eval()
    reqs = _requests(net)
    tok = tiny_tokenizer()
    ref = HFLM(pretrained=net, tokenizer=tok, batch_size=4)._loglikelihood_tokens(reqs)
    lm = SharedContextLM(pretrained=net, tokenizer=tok, batch_size=4)
    got = lm._loglikelihood_tokens(reqs)
    assert lm._sharing_failed
    assert max(abs(a[0] - b[0]) for a, b in zip(ref, got, strict=True)) < 1e-4
    assert [a[1] for a in ref] == [b[1] for b in got]
