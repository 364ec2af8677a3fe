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
