"""The eval stage on tiny runs: every checkpoint scored, base scored once and cached, reruns
reuse results, unmerged adapters score like merged models, bad input is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from learnforget.errors import ConfigError
from learnforget.eval.scoring import load_for_eval, score
from learnforget.eval.stage import evaluate_run
from learnforget.eval.suite import task_specs
from learnforget.train.loop import fit, setup

SMOKE_FAST = ["eval=smoke", "eval.limit=4", "eval.max_gen_toks=16"]


@pytest.fixture
def lora_run(make_cfg):
    cfg = make_cfg("method=lora", "method.r=4", "train.lr=5e-3", *SMOKE_FAST)
    return cfg, fit(setup(cfg))


def test_eval_stage_scores_every_checkpoint_against_cached_base(lora_run, capsys):
    cfg, run = lora_run
    summary_path = evaluate_run(run, cfg.eval)
    summary = json.loads(summary_path.read_text())
    rows = summary["rows"]
    assert [r["checkpoint"] for r in rows] == ["base", "step-000001", "step-000002"]
    assert [r["tokens"] for r in rows] == [0, 64, 128]
    for r in rows:
        for key in ("target_score", "forgetting_score", "target_ce", "forgetting_ce"):
            assert r[key] is not None, key
        assert 0 <= r["forgetting_score"] <= 1 and r["target_ce"] > 0
    base, last = rows[0], rows[-1]
    assert base["delta/forgetting_score"] == 0.0
    assert last["delta/target_ce"] == pytest.approx(last["target_ce"] - base["target_ce"])
    assert last["target_ce"] != base["target_ce"]  # the adapter changed the model
    per_ckpt = json.loads((run / "eval" / "step-000002.json").read_text())
    tasks = per_ckpt["tasks"]
    assert set(tasks) == {"lf_smoke_hellaswag", "lf_smoke_arc", "lf_smoke_winogrande",
                          "lf_smoke_gsm8k", "lf_smoke_humaneval"}
    assert tasks["lf_smoke_hellaswag"]["chance"] == 0.25
    assert tasks["lf_smoke_winogrande"]["n"] == 4
    assert all(t["config_hash"] and t["lm_eval_version"] for t in tasks.values())
    assert per_ckpt["diversity"]["samples"] == 4
    # per-item results for the base and each checkpoint; the paired columns follow from them
    base_json = json.loads(next((run.parents[1] / "_base").rglob("*.json")).read_text())
    for name, t in tasks.items():
        items, b_items = t["items"], base_json["tasks"][name]["items"]
        assert items["doc_id"] == b_items["doc_id"] == list(range(4)), name
        assert sum(items["correct"]) / 4 == pytest.approx(t["primary"]), name
        delta = t["primary"] - base_json["tasks"][name]["primary"]
        assert last[f"paired/{name}/acc_delta"] == pytest.approx(delta), name
        flips = [(b, c) for b, c in zip(b_items["correct"], items["correct"], strict=True)]
        assert last[f"paired/{name}/right_to_wrong"] == flips.count((1.0, 0.0)), name
        assert last[f"paired/{name}/wrong_to_right"] == flips.count((0.0, 1.0)), name
    assert "ll_gold_delta" in "".join(last) and "mde/lf_smoke_arc/acc" in base
    assert last["paired_forgetting_tasks"] == 3  # hellaswag, arc, winogrande
    base_files = list((run.parents[1] / "_base").rglob("*.json"))
    assert len(base_files) == 1
    assert (summary_path.with_suffix(".csv")).read_text().count("\n") == 4

    # A rerun reuses every result: nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in [*base_files, run / "eval/step-000001.json"]}
    capsys.readouterr()
    evaluate_run(run, cfg.eval)
    assert "scoring the base model" not in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_unmerged_adapter_scores_like_the_merged_model(lora_run):
    """Tolerance: loglikelihood accuracies identical; cross-entropies within 1e-4 nats."""
    cfg, run = lora_run
    from omegaconf import OmegaConf

    from learnforget.assets.models import load_tokenizer
    from learnforget.eval.task_yaml import write_task_dir

    run_cfg = OmegaConf.load(run / "config.yaml")
    ev = cfg.eval.copy()
    ev.tasks = [t for t in ev.tasks if t.kind != "humaneval"]
    ev.diversity.prompts = []
    cache = Path(cfg.paths.cache_dir)
    specs = task_specs(ev, cache)
    include = write_task_dir(specs, run / "eval" / "parity_tasks")
    tok = load_tokenizer(str(run / "tokenizer"))
    unmerged = load_for_eval(run_cfg, run / "checkpoints/step-000002", cache, "cpu")
    a = score(unmerged, tok, run_cfg, ev, specs, include, cache)
    merged = unmerged.merge_and_unload()
    b = score(merged, tok, run_cfg, ev, specs, include, cache)
    for name in a["tasks"]:
        assert a["tasks"][name]["primary"] == b["tasks"][name]["primary"], name
    for name in a["ppl"]:
        assert abs(a["ppl"][name]["ce"] - b["ppl"][name]["ce"]) < 1e-4


def test_prompt_tuning_checkpoint_evaluates(make_cfg):
    cfg = make_cfg("method=prompt", "method.num_virtual_tokens=4", *SMOKE_FAST,
                   "eval.tasks=[]", "eval.diversity.prompts=[]")
    run = fit(setup(cfg))
    model = load_for_eval(cfg, run / "checkpoints/step-000001", Path(cfg.paths.cache_dir), "cpu")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert model(input_ids=ids).logits.shape[1] == 5  # virtual-token rows dropped for lm-eval
    rows = json.loads(evaluate_run(run, cfg.eval).read_text())["rows"]
    assert len(rows) == 3 and rows[-1]["target_ce"] > 0


def test_bad_eval_input(make_cfg, lora_run, tmp_path):
    cfg, run = lora_run
    with pytest.raises(ConfigError, match="is not a run folder"):
        evaluate_run(tmp_path, cfg.eval)
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="has no checkpoints"):
        evaluate_run(empty, cfg.eval)
    bad = cfg.eval.copy()
    bad.tasks[0].data = "tests/fixtures/eval/nope.jsonl"
    with pytest.raises(ConfigError, match="eval task lf_smoke_hellaswag: data file not found"):
        evaluate_run(run, bad)
    bad = cfg.eval.copy()
    bad.checkpoint = "step-999"
    with pytest.raises(ConfigError, match="'step-999' is not a checkpoint"):
        evaluate_run(run, bad)
    no_opt_in = cfg.eval.copy()
    no_opt_in.allow_code_execution = False
    with pytest.raises(ConfigError, match="allow_code_execution"):
        evaluate_run(run, no_opt_in)
    assert not (empty / "eval").exists()


PAPER_HUB_MSG = ("eval=paper_hub task hellaswag needs the Hugging Face hub to download its data, "
                 "which cannot be reached here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set): "
                 "use eval=offline")


def test_paper_hub_suite_stops_before_model_work_without_the_hub(make_cfg, tmp_path,
                                                                  monkeypatch):
    import re

    from omegaconf import OmegaConf

    import learnforget.eval.stage as ev_mod

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = make_cfg("eval=paper_hub")
    with pytest.raises(ConfigError, match=re.escape(PAPER_HUB_MSG)):
        task_specs(cfg.eval, Path(cfg.paths.cache_dir))
    # the eval stage on a (fake) run folder: refused before any tokenizer or model is loaded
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "manifest.json").write_text(
        json.dumps({"step": 1, "tokens": 64, "format": "peft"}))
    OmegaConf.save(cfg, run / "config.yaml")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ev_mod, "load_for_eval", no_model)
    monkeypatch.setattr("learnforget.assets.models.load_tokenizer", no_model)
    with pytest.raises(ConfigError, match=re.escape(PAPER_HUB_MSG)):
        evaluate_run(run, cfg.eval)
    assert not (run / "eval").exists()


def test_paper_suite_runs_offline_on_the_fetched_benchmarks(make_cfg, tmp_path, monkeypatch):
    """eval=paper needs no hub: with HF offline its tasks resolve to the `benchmarks` asset,
    and without that asset the error names the fetch command."""
    import learnforget.assets.benchmarks as bd

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = make_cfg("eval=paper")
    with pytest.raises(ConfigError, match="run `learnforget assets fetch benchmarks`"):
        task_specs(cfg.eval, tmp_path / "empty_cache")
    fix = Path(__file__).parent / "fixtures"
    monkeypatch.setattr(bd, "benchmark_path",
                        lambda cache, name, fetch=True: fix / "benchmarks" / bd.file_name(name))
    for t in cfg.eval.tasks:
        if t.kind == "humaneval":
            t.data = "package:humaneval.jsonl"
    specs = {s.name: s for s in task_specs(cfg.eval, tmp_path / "empty_cache")}
    assert {n: (s.kind, s.role, s.num_fewshot, s.data_file.name)
            for n, s in list(specs.items())[:4]} == {
        "hellaswag": ("hellaswag", "forgetting", None, "hellaswag_validation.jsonl"),
        "arc_challenge": ("arc_challenge", "forgetting", None, "arc_challenge_test.jsonl"),
        "winogrande": ("winogrande", "forgetting", None, "winogrande_validation.jsonl"),
        "gsm8k": ("gsm8k", "target", 5, "gsm8k_test.jsonl")}


def test_paper_hub_suite_specs(make_cfg, tmp_path, monkeypatch):
    """With the hub reachable (as far as the settings go): builtin specs by lm-eval name, and
    the sampled HumanEval settings pass through to its task; no network is used."""
    from learnforget.eval.suite import eval_key
    from learnforget.eval.task_yaml import task_config_hash, write_task_dir

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "0")
    cfg = make_cfg("eval=paper_hub")
    for t in cfg.eval.tasks:  # the HumanEval asset is not in the test cache: a fixture instead
        if t.kind == "humaneval":
            t.data = "package:humaneval.jsonl"
    specs = task_specs(cfg.eval, Path(cfg.paths.cache_dir))
    by_name = {s.name: s for s in specs}
    assert list(by_name) == ["hellaswag", "arc_challenge", "winogrande", "gsm8k", "lf_humaneval",
                             "lf_humaneval_sampled"]
    assert {n: (s.kind, s.role, s.chance, s.num_fewshot, s.data_file)
            for n, s in list(by_name.items())[:4]} == {
        "hellaswag": ("builtin", "forgetting", 0.25, None, None),
        "arc_challenge": ("builtin", "forgetting", None, None, None),
        "winogrande": ("builtin", "forgetting", 0.5, None, None),
        "gsm8k": ("builtin", "target", None, 5, None)}
    greedy, sampled = by_name["lf_humaneval"], by_name["lf_humaneval_sampled"]
    assert greedy.samples is None and greedy.ks == [1]
    assert (sampled.samples, sampled.temperature, sampled.top_p, sampled.ks) == (50, 0.2, 0.95, [1])
    include = write_task_dir(specs, tmp_path / "tasks")
    gen = (include / "lf_humaneval_sampled.yaml").read_text()
    assert "repeats: 50" in gen and "temperature: 0.2" in gen and "top_p: 0.95" in gen
    assert eval_key(cfg.eval, specs, include, body_dtype="float32")  # every task hashes (builtin: its YAML text)
    assert task_config_hash(include, "gsm8k") != task_config_hash(include, "hellaswag")
    bad = cfg.eval.copy()
    bad.tasks[0].name = "mmlu"
    with pytest.raises(ConfigError, match="eval task mmlu: kind builtin runs lm-eval's own task"):
        task_specs(bad, Path(cfg.paths.cache_dir))


def test_drift_in_the_eval_stage_and_the_analysis(make_cfg):
    """Drift is 0 for the base, > 0 for a finetuned checkpoint, and the analysis can use it as
    the forgetting axis."""
    from learnforget.analysis.stage import analyze

    cfg = make_cfg("method=full", "train.lr=1e-3", "eval=drift",
                   "eval.ppl=[{name:target_heldout,source:run,max_blocks:2,role:target}]",
                   "eval.drift.n_prompts=4", "eval.drift.max_new_tokens=8",
                   "eval.drift.samples_per_prompt=1", "eval.drift.n_boot=50")
    run = fit(setup(cfg))
    rows = json.loads(evaluate_run(run, cfg.eval).read_text())["rows"]
    assert rows[0]["drift_kl"] == 0.0
    assert rows[-1]["drift_kl"] > 0 and rows[-1]["drift_kl_ci_low"] <= rows[-1]["drift_kl"]
    out = analyze(run.parents[1], spectra=False)
    figs = [Path(p).name for p in out.get("figures", [])] if isinstance(out, dict) else []
    assert any(f.startswith("learning_vs_drift") for f in figs), figs


def test_base_model_alone_fills_the_cache_a_run_then_reuses(make_cfg, runs_dir, cache_dir,
                                                            monkeypatch, capsys):
    """`learnforget eval model=<m> eval=<suite>` with no trained run scores the base model into
    runs/_base/; a run's eval later reuses those scores instead of scoring the base again."""
    from learnforget.cli import main

    monkeypatch.setenv("LEARNFORGET_RUNS_DIR", str(runs_dir))
    monkeypatch.setenv("LEARNFORGET_CACHE_DIR", str(cache_dir))
    # the same data and block length as make_cfg's runs (the base's held-out CE is on them)
    suite = [*SMOKE_FAST, "eval.diversity.prompts=[]", "data.max_docs=8", "data.heldout_docs=2",
             "train.seq_len=32", "train.batch_size=2"]
    assert main(["eval", "model=tiny_llama", *suite]) == 0
    out = capsys.readouterr().out
    assert "no trained run for this config" in out and "scoring the base model tiny_llama" in out
    (cache,) = (runs_dir / "_base" / "tiny_llama").glob("*.json")
    base = json.loads(cache.read_text())
    assert base["model"] == "tiny_llama" and base["suite"] == "smoke"
    assert set(base["tasks"]) >= {"lf_smoke_hellaswag", "lf_smoke_gsm8k"}
    assert base["ppl"]["target_heldout"]["ce"] > 0
    assert f"base scores of tiny_llama on eval=smoke: {cache}" in out
    assert not (runs_dir / "default").exists()  # no run folder was made

    cfg = make_cfg("method=lora", "method.r=4", *SMOKE_FAST, "eval.diversity.prompts=[]")
    run = fit(setup(cfg))
    stamp = cache.stat().st_mtime_ns
    capsys.readouterr()
    rows = json.loads(evaluate_run(run, cfg.eval).read_text())["rows"]
    assert "scoring the base model" not in capsys.readouterr().out
    assert cache.stat().st_mtime_ns == stamp
    assert rows[0]["target_ce"] == pytest.approx(base["ppl"]["target_heldout"]["ce"])


def test_a_users_own_task_and_suite_from_the_hydra_search_path(runs_dir, cache_dir, tmp_path,
                                                                monkeypatch, capsys):
    """docs/evaluation.md "Your own task": a multiple-choice jsonl file and a suite file in the user's own
    config folder, found through hydra.searchpath, scored on the base model."""
    from learnforget.cli import main

    monkeypatch.setenv("LEARNFORGET_RUNS_DIR", str(runs_dir))
    monkeypatch.setenv("LEARNFORGET_CACHE_DIR", str(cache_dir))
    data = tmp_path / "capitals.jsonl"
    items = [{"input": "The capital of France is", "choices": [" Paris", " Rome", " Oslo"],
              "gold": 0},
             {"input": "The capital of Italy is", "choices": [" Paris", " Rome"], "gold": 1},
             {"input": "The capital of Norway is", "choices": [" Oslo", " Bern"], "gold": 0}]
    data.write_text("".join(json.dumps(x) + "\n" for x in items))
    (tmp_path / "myconf/eval").mkdir(parents=True)
    (tmp_path / "myconf/eval/capitals.yaml").write_text(
        "defaults:\n  - _base\nname: capitals\ntasks:\n"
        f"  - {{name: my_capitals, kind: mc_json, data: {data}, role: forgetting}}\n")
    assert main(["eval", f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "eval=capitals",
                 "model=tiny_llama"]) == 0
    (cache,) = (runs_dir / "_base" / "tiny_llama").glob("capitals-*.json")
    task = json.loads(cache.read_text())["tasks"]["my_capitals"]
    assert task["n"] == 3 and task["primary_metric"] == "acc"
    assert 0 <= task["primary"] <= 1
    assert task["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
