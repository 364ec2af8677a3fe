"""eval.precision: checked values, part of the eval (and base-cache) key, recorded in every
result, applied to the whole stage; bf16 scoring agrees with fp32 to a loose tolerance."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_hflm
from omegaconf import OmegaConf

from learnforget.errors import ConfigError
from learnforget.eval.scoring import cast_for_scoring
from learnforget.eval.stage import evaluate_run
from learnforget.eval.suite import eval_key, scoring_precision
from learnforget.train.loop import fit, setup

SMOKE_FAST = ["eval=smoke", "eval.limit=4", "eval.max_gen_toks=16"]


def test_bad_precision_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"eval.precision='fp16' is unknown .*model, fp32, bf16"):
        scoring_precision(OmegaConf.create({"precision": "fp16"}))
    assert scoring_precision(OmegaConf.create({})) == "model"


def test_default_precision_keeps_the_old_key_and_others_change_it(tmp_path):
    old = OmegaConf.create({"name": "s", "seed": 1})
    key = eval_key(old, [], tmp_path, body_dtype="float32")
    assert eval_key(OmegaConf.merge(old, {"precision": "model"}), [], tmp_path,
                    body_dtype="float32") == key
    keys = {eval_key(OmegaConf.merge(old, {"precision": p}), [], tmp_path,
                     body_dtype={"fp32": "float32", "bf16": "bfloat16"}[p]) for p in
            ("fp32", "bf16")}
    assert len(keys) == 2 and key not in keys


def test_cast_model_gives_fp32_logits_close_to_fp32():
    lm = tiny_hflm()
    model = lm.model
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits, -1)
        cast_for_scoring(model, OmegaConf.create({"precision": "bf16"}))
        assert next(model.parameters()).dtype == torch.bfloat16
        out = model(ids).logits
    assert out.dtype == torch.float32
    dev = (torch.log_softmax(out, -1) - ref).abs()
    assert float(dev.mean()) < 0.05 and float(dev.max()) < 0.5


def test_stage_records_precision_and_keeps_base_caches_apart(make_cfg):
    cfg = make_cfg("method=lora", "method.r=4", "train.lr=5e-3", *SMOKE_FAST)
    run = fit(setup(cfg))
    last = run / "eval" / "step-000002.json"
    fp = json.loads(evaluate_run(run, cfg.eval).read_text())
    fp_result = json.loads(last.read_text())
    assert fp_result["precision"] == {"setting": "model", "dtype": "float32"}
    assert fp_result["meta"]["precision"] == fp_result["precision"]
    fp32_head = {"policy": "fp32", "logits": "float32", "weight": "float32"}
    assert fp_result["head"] == fp_result["meta"]["head"] == fp32_head
    # an fp32 body: eval.head changes nothing, so neither the key nor the stored results
    same = json.loads(evaluate_run(run, OmegaConf.merge(cfg.eval, {"head": "model"})).read_text())
    assert same["eval_key"] == fp["eval_key"] and json.loads(last.read_text()) == fp_result
    ev = OmegaConf.merge(cfg.eval, {"precision": "bf16"})
    bf = json.loads(evaluate_run(run, ev).read_text())
    bf_result = json.loads(last.read_text())  # rescored: its key changed
    assert bf_result["precision"] == {"setting": "bf16", "dtype": "bfloat16"}
    assert bf_result["head"] == fp32_head  # the fp32 copy of the weight as loaded (fp32)
    assert bf_result["meta"]["precision"]["setting"] == "bf16"
    bases = sorted((run.parents[1] / "_base").rglob("smoke*.json"))
    assert len(bases) == 2  # one base per precision, each keyed by it
    settings = {json.loads(p.read_text())["precision"]["setting"] for p in bases}
    assert settings == {"model", "bf16"}
    assert fp["eval_key"] != bf["eval_key"]
    for a, b in zip(fp["rows"], bf["rows"], strict=True):
        assert b["target_ce"] == pytest.approx(a["target_ce"], rel=0.02)
    a_items = fp_result["tasks"]["lf_smoke_hellaswag"]["items"]["lls"]
    b_items = bf_result["tasks"]["lf_smoke_hellaswag"]["items"]["lls"]
    for xa, xb in zip(a_items, b_items, strict=True):
        assert xb == pytest.approx(xa, abs=0.5)
