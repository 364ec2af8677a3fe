"""The capacity control study (sweeps/capacity_control.yaml): the table's selection, intervals
and bits per parameter on synthetic runs, and the toy size end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from learnforget.errors import ConfigError


def _run(arm, lr, curve, correct, *, k=4, params=100, reference=False, r=None):
    correct = [float(c) for c in correct]
    n = len(correct)
    recall = float(np.mean(correct))
    last = {"checkpoint": f"epoch-{len(curve)}", "recall": recall, "chance": 1 / k,
            "heldout_recall": 0.25, "n_facts": n, "k": k, "info_bits": n * math.log2(k),
            "bits": n * max(0.0, (recall - 1 / k) / (1 - 1 / k)) * math.log2(k),
            "fano_bits": 0.0, "trainable_params": params, "r": r,
            "bits_per_param": n * max(0.0, (recall - 1 / k) / (1 - 1 / k)) * math.log2(k)
            / params, "items": {"doc_id": list(range(n)), "correct": correct}}
    return {"run": f"{arm}-{lr}", "arm": arm, "reference": reference, "r": r, "lr": lr,
            "curve": [(f"epoch-{i + 1}", v) for i, v in enumerate([*curve, recall])],
            "last": last}


def test_table_picks_each_arms_best_lr_flags_rising_arms_and_pairs_full():
    from learnforget.analysis.capacity_study import capacity_markdown, summarise

    rng = np.random.default_rng(0)
    n = 400
    full_c = rng.random(n) < 0.9
    lora_hi = rng.random(n) < 0.4
    lora_lo = rng.random(n) < 0.3
    runs = [
        _run("full", 1e-3, [0.5], full_c, params=1000, reference=True),   # rose 0.4: rising
        _run("full", 3e-3, [0.5], full_c, params=1000, reference=True),   # tie: 1e-3 kept
        _run("lora_r1", 1e-2, [lora_hi.mean() - 0.01], lora_hi, params=10, r=1),  # converged
        _run("lora_r1", 3e-3, [0.1], lora_lo, params=10, r=1),
        _run("lora_r4", 3e-3, [0.1], lora_hi, params=40, r=4),             # rose 0.30: rising
    ]
    table = summarise(runs)
    arms = {a["arm"]: a for a in table["arms"]}
    assert [a["arm"] for a in table["arms"]] == ["full", "lora_r1", "lora_r4"]
    assert arms["full"]["lr"] == 1e-3 and arms["lora_r1"]["lr"] == 1e-2
    assert arms["lora_r1"]["lrs"] == {1e-2: pytest.approx(lora_hi.mean()),
                                      3e-3: pytest.approx(lora_lo.mean())}
    assert arms["lora_r1"]["converged"] is True and arms["full"]["converged"] is False
    assert arms["lora_r4"]["converged"] is False
    # recall interval against the normal approximation of a proportion
    p = full_c.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert arms["full"]["recall_lo"] == pytest.approx(p - half, abs=0.01)
    assert arms["full"]["recall_hi"] == pytest.approx(p + half, abs=0.01)
    # full minus LoRA: the difference of means, the paired interval around it
    gap = full_c.mean() - lora_hi.mean()
    a = arms["lora_r1"]
    assert a["gap"] == pytest.approx(gap) and a["gap_lo"] < gap < a["gap_hi"]
    d = full_c.astype(float) - lora_hi.astype(float)
    se = d.std() / math.sqrt(n)
    assert a["gap_hi"] - a["gap_lo"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    # bits per parameter and the anchor, by hand: N (recall - 1/4) / (3/4) * 2 bits
    assert a["bits_per_param"] == pytest.approx(n * (lora_hi.mean() - 0.25) / 0.75 * 2 / 10)
    assert a["capacity_bits"] == 20 and a["info_bits"] == 800
    md = capacity_markdown(table)
    assert "(still rising)" in md.splitlines()[4] and "(still rising)" not in md.splitlines()[3]
    assert "| 40.00 |" in md  # lora_r1: 800 bits over 2 x 10 params
    flat = summarise([runs[0], _run("lora_r16", 1e-3, [0.25], rng.random(n) < 0.25, r=16)])
    assert flat["arms"][1]["at_chance"] is True and arms["lora_r1"]["at_chance"] is False
    assert "(at chance: not learning)" in capacity_markdown(flat)
    with pytest.raises(ConfigError, match="one fact set"):
        summarise([*runs, _run("lora_r16", 1e-3, [0.1], lora_hi[:100], params=5, r=16)])
    assert summarise([]) == {"arms": [], "runs": []}


def _recall_by_hand(run_dir, checkpoint, pairs, values, base=None):
    """Recall with plain transformers: sum of log-softmax of each value's tokens after the
    prompt, one sequence at a time, argmax over the values."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck = run_dir / "checkpoints" / checkpoint
    tok = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    if (ck / "adapter_config.json").exists():
        cfg = json.loads((ck / "adapter_config.json").read_text())
        base = AutoModelForCausalLM.from_pretrained(base or cfg["base_model_name_or_path"])
        model = PeftModel.from_pretrained(base, ck)
    else:
        model = AutoModelForCausalLM.from_pretrained(ck)
    model.eval()
    right, saving = 0, 0.0
    with torch.no_grad():
        for prompt, gold in pairs:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            scores = []
            for v in values:
                ids = p + tok(v, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(p), len(ids))))
            right += int(values[int(np.argmax(scores))] == gold)
            logq = scores[values.index(gold)] - np.logaddexp.reduce(scores)
            saving += math.log2(len(values)) + logq / math.log(2)
    return right / len(pairs), saving


@pytest.mark.slow
def test_capacity_control_toy_sweep_writes_the_table(tmp_path, cache_dir):
    """`learnforget sweep capacity_control --size toy`: 8 runs (full x 2 LRs, LoRA r=1/4/16 x
    2 LRs), the analysis's capacity table; the recall it reports is recomputed by hand for the
    full arm; a rerun launches nothing and leaves the table as it was."""
    from omegaconf import OmegaConf

    from learnforget.data.facts import fact_values
    from learnforget.data.sources import load_records, split_records
    from learnforget.studies.command import sweep_main

    extra = [f"paths.runs_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    assert sweep_main("capacity_control", extra, size="toy") == 0
    out = tmp_path / "capacity_control_toy" / "_analysis"
    table = json.loads((out / "capacity.json").read_text())
    arms = table["arms"]
    assert [a["r"] for a in arms] == [None, 1, 4, 16] and len(table["runs"]) == 8
    assert all(a["n_facts"] == 32 and a["k"] == 4 and a["info_bits"] == 64 for a in arms)
    assert all(len(a["curve"]) == 2 and len(a["lrs"]) == 2 for a in arms)  # epochs 4, 8
    full = arms[0]
    assert full["trainable_params"] > 100 * arms[1]["trainable_params"]
    assert arms[1]["trainable_params"] * 4 == arms[2]["trainable_params"]
    assert all(a["gap_lo"] <= a["gap"] <= a["gap_hi"] for a in arms[1:])
    run = tmp_path / "capacity_control_toy" / full["run"]
    cfg = OmegaConf.load(run / "config.yaml")
    train, _ = split_records(load_records(cfg.data), int(cfg.data.heldout_docs))
    by_hand, bits = _recall_by_hand(run, full["checkpoint"], train,
                                    [f" {v}" for v in fact_values(4)])
    assert full["recall"] == pytest.approx(by_hand)
    assert full["ll_bits"] == pytest.approx(bits, abs=1e-3)
    md = (out / "capacity.md").read_text()
    assert "32 trained facts x log2 4 = 64 bits" in md
    assert sweep_main("capacity_control", extra, size="toy") == 0
    assert (out / "capacity.md").read_text() == md


def test_the_base_is_named_apart_and_its_facts_checked_disjoint_from_the_arms():
    """sweeps/capacity_control_pretrained.yaml: arms on other facts than the base's; a table
    over two fact sets (another data.facts_offset) is refused; the note under the table says
    whether the arms' facts overlap the base's."""
    from learnforget.analysis.capacity_study import capacity_markdown, summarise

    rng = np.random.default_rng(1)
    full = _run("full", 1e-3, [0.5], rng.random(64) < 0.9, params=1000, reference=True)
    lora = _run("lora_r1", 1e-2, [0.3], rng.random(64) < 0.3, params=10, r=1)
    for r in (full, lora):
        r["last"]["facts_offset"], r["max_docs"] = 2000, 68
    table = summarise([full, lora])
    assert table["arms"][0]["facts_offset"] == 2000
    base = {"run": "base", "checkpoint": "epoch-20", "recall": 0.99, "n_facts": 2000,
            "facts_offset": 0, "facts_end": 2000, "k": 4, "trainable_params": 1000}
    md = capacity_markdown({**table, "bases": [base]})
    assert "starts from the base `base` (epoch-20" in md and "2,000 other facts" in md
    assert "disjoint from the base's" in md and "OVERLAPPING" not in md
    md = capacity_markdown({**table, "bases": [{**base, "facts_end": 2001}]})
    assert "OVERLAPPING the base's" in md
    assert "disjoint" in capacity_markdown({**table, "bases": [{**base, "facts_offset": 2068,
                                                                 "facts_end": 4068}]})
    other = _run("lora_r4", 1e-2, [0.3], rng.random(64) < 0.3, params=40, r=4)
    with pytest.raises(ConfigError, match="facts_offset"):
        summarise([full, lora, other])  # other: the first 64 facts, not those from 2,000


@pytest.mark.slow
def test_capacity_control_pretrained_toy_sweep(tmp_path, cache_dir):
    """`learnforget sweep capacity_control_pretrained --size toy`: the base trains first on
    facts 0..35, every arm starts from its last checkpoint (model.init_from) on facts
    2,000..2,035; the table lists the base apart and the arms' recall matches a recount by
    hand; a rerun launches nothing."""
    from omegaconf import OmegaConf

    from learnforget.data.facts import fact_values
    from learnforget.data.sources import load_records, split_records
    from learnforget.studies.command import sweep_main

    extra = [f"paths.runs_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    assert sweep_main("capacity_control_pretrained", extra, size="toy") == 0
    root = tmp_path / "capacity_control_pretrained_toy"
    table = json.loads((root / "_analysis" / "capacity.json").read_text())
    arms = table["arms"]
    assert [a["r"] for a in arms] == [None, 1, 4, 16] and len(table["runs"]) == 4  # 1 LR each
    assert [b["run"] for b in table["bases"]] == ["base"]
    assert table["bases"][0]["facts_offset"] == 0 and table["bases"][0]["facts_end"] == 36
    assert all(a["facts_offset"] == 2000 and a["n_facts"] == 32 for a in arms)
    base_cfg = OmegaConf.load(root / "base" / "config.yaml")
    base_names = {p.split(" lives in")[0] for p, _ in load_records(base_cfg.data)}
    full = arms[0]
    run = root / full["run"]
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.model.init_from == "base/last"
    notes = " ".join(json.loads((run / "run.json").read_text())["train"]["notes"])
    assert "model.init_from=base/last" in notes and "epoch-4" in notes
    train, held = split_records(load_records(cfg.data), int(cfg.data.heldout_docs))
    assert not {p.split(" lives in")[0] for p, _ in train + held} & base_names
    by_hand, bits = _recall_by_hand(run, full["checkpoint"], train,
                                    [f" {v}" for v in fact_values(4)])
    assert full["recall"] == pytest.approx(by_hand)
    assert full["ll_bits"] == pytest.approx(bits, abs=1e-3)
    assert full["ll_bits_lo"] <= full["ll_bits"] <= full["ll_bits_hi"]
    # a LoRA arm is scored on the base's weights it trained from, not on the random init
    r16 = arms[3]
    by_hand, bits = _recall_by_hand(root / r16["run"], r16["checkpoint"], train,
                                    [f" {v}" for v in fact_values(4)],
                                    base=root / "base" / "checkpoints" / "epoch-4")
    assert r16["recall"] == pytest.approx(by_hand)
    assert r16["ll_bits"] == pytest.approx(bits, abs=1e-3)
    md = (root / "_analysis" / "capacity.md").read_text()
    assert "disjoint from the base's" in md and "| base |" not in md
    assert sweep_main("capacity_control_pretrained", extra, size="toy") == 0
    assert (root / "_analysis" / "capacity.md").read_text() == md


def test_likelihood_bits_interval_and_plateau_flag():
    """The likelihood bits: their sum over facts with a bootstrap interval (against the normal
    approximation of a sum), per parameter, and converged when they rose by <= 2% of the
    facts' bits over the last interval."""
    from learnforget.analysis.capacity_study import capacity_markdown, summarise

    rng = np.random.default_rng(2)
    n, k = 500, 4
    saving = rng.normal(0.3, 0.8, n)  # bits per fact
    runs = []
    for arm, prev, r in (("lora_r1", saving.sum() - 10.0, 1), ("lora_r4", saving.sum() - 40.0, 4)):
        run = _run(arm, 1e-2, [0.3], rng.random(n) < 0.3, k=k, params=10 * r, r=r)
        run["last"]["items"]["saving"] = saving.tolist()
        run["last"]["ll_bits"] = float(saving.sum())
        run["last"]["heldout_ll_bits_per_fact"] = -0.05
        run["bits_curve"] = [("epoch-1", prev), ("epoch-2", float(saving.sum()))]
        runs.append(run)
    arms = {a["arm"]: a for a in summarise(runs)["arms"]}
    a = arms["lora_r1"]
    half = 1.96 * saving.std() * math.sqrt(n)
    assert a["ll_bits"] == pytest.approx(saving.sum())
    assert a["ll_bits_lo"] == pytest.approx(saving.sum() - half, rel=0.1, abs=5)
    assert a["ll_bits_hi"] == pytest.approx(saving.sum() + half, rel=0.1, abs=5)
    # 2% of 500 x 2 bits = 20 bits: +10 converged, +40 still rising
    assert a["bits_converged"] is True and arms["lora_r4"]["bits_converged"] is False
    md = capacity_markdown(summarise(runs))
    assert f"({saving.sum() / 10:.3f})" in md and "(converged)" in md and "| -0.050 |" in md


def test_an_adapter_on_an_init_from_run_is_scored_on_the_source_weights(make_cfg, cache_dir):
    """load_for_eval of a LoRA checkpoint whose run started from model.init_from=src/last: the
    adapter sits on the source run's weights (logits equal to peft on the source checkpoint
    loaded by hand), not on the model's random init (different logits)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from learnforget.eval.scoring import load_for_eval
    from learnforget.runfolder import RunFolder
    from learnforget.train.loop import train

    common = ["train.precision=fp32", "data.max_docs=12", "data.heldout_docs=2",
              "data.facts_values=4"]
    src = train(make_cfg("method=full", "train.lr=1e-2", "run_name=src", *common, data="facts"))
    cfg = make_cfg("method=lora", "method.r=2", "train.lr=1e-2", "model.init_from=src/last",
                   "data.facts_offset=12", *common, data="facts")
    run = train(cfg)
    ckpt = RunFolder(run).checkpoint_dirs()[-1]
    got = load_for_eval(cfg, ckpt, cache_dir, "cpu")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    source = AutoModelForCausalLM.from_pretrained(RunFolder(src).checkpoint_dirs()[-1])
    want = PeftModel.from_pretrained(source, ckpt).eval()
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"]), ckpt).eval()
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (got, want, plain))
    assert torch.allclose(a, b, atol=1e-5)
    assert (a - c).abs().max() > 1e-3
