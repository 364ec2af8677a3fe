"""One base model per eval process (eval.swap_adapters, learnforget.eval.swap): scoring several
adapter checkpoints, of one run and of runs of other ranks or methods, by swapping adapters on
one loaded base gives the same per-item results as a fresh load per checkpoint, bit for bit;
the base is loaded once instead of once per checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import learnforget.assets.models as models_mod
from learnforget.errors import ConfigError
from learnforget.eval.stage import evaluate_run, evaluate_runs
from learnforget.eval.suite import eval_key
from learnforget.eval.swap import BasePool
from learnforget.methods.registry import shares_base_in_eval
from learnforget.train.loop import fit, setup

# the default suite (smoke: three multiple-choice tasks, GSM8K generation, HumanEval with code
# execution, two cross-entropy sets, sampled diversity), a few documents per task
SMOKE_FAST = ["eval=smoke", "eval.limit=3", "eval.max_gen_toks=12", "eval.diversity.samples=2",
              "eval.diversity.max_new_tokens=6"]
# the multiple-choice tasks and cross-entropy sets only (the per-method checks)
MC_ONLY = ["eval=smoke", "eval.limit=4", "eval.diversity.prompts=[]",
           "eval.tasks=[{name: lf_smoke_hellaswag, kind: hellaswag, data: 'package:hellaswag.jsonl'},"
           "{name: lf_smoke_arc, kind: arc_challenge, data: 'package:arc_challenge.jsonl'}]"]
VOLATILE = ("wall_time_s", "cpu_time_s", "meta", "cache_file", "versions")


def _count_loads(monkeypatch) -> dict[str, int]:
    seen = {"n": 0}
    real = models_mod.load_model

    def counting(*args, **kwargs):
        seen["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(models_mod, "load_model", counting)
    return seen


def _results(runs: list[Path]) -> dict[str, dict]:
    """Every checkpoint's result and the base cache's, without timings and environment."""
    out = {}
    for run in runs:
        for f in sorted((run / "eval").glob("step-*.json")):
            out[f"{run.name}/{f.stem}"] = json.loads(f.read_text())
    for f in sorted((runs[0].parents[1] / "_base").rglob("*.json")):
        out[f"base/{f.name}"] = json.loads(f.read_text())
    return {k: {kk: vv for kk, vv in v.items() if kk not in VOLATILE} for k, v in out.items()}


def _forget(runs: list[Path]) -> None:
    for run in runs:
        for f in (run / "eval").glob("step-*.json"):
            f.unlink()
    shutil.rmtree(runs[0].parents[1] / "_base")


def _swap_then_fresh(runs, ev, monkeypatch):
    """Score the runs' checkpoints (and the base) in one process with swapping, then again with
    a fresh load each; returns (swapped results, fresh results, loads each way)."""
    loads = _count_loads(monkeypatch)
    pool = BasePool()  # what evaluate_runs does, with the pool kept to read its counts
    for run in runs:
        evaluate_run(run, ev, pool=pool)
    swapped, n_swap = _results(runs), loads["n"]
    ways = {"wraps": pool.current.wraps, "swaps": pool.current.swaps}
    how = {json.loads(f.read_text())["meta"]["adapter_load"]
           for run in runs for f in (run / "eval").glob("step-*.json")}
    assert how == {"swapped onto the shared base"}
    _forget(runs)
    fresh_ev = ev.copy()
    fresh_ev.swap_adapters = False
    for run in runs:
        evaluate_run(run, fresh_ev)
    return swapped, _results(runs), (n_swap, loads["n"] - n_swap), ways


def _assert_identical(swapped: dict, fresh: dict) -> None:
    assert swapped.keys() == fresh.keys()
    for label in swapped:
        a, b = swapped[label], fresh[label]
        for name, task in a.get("tasks", {}).items():
            # per item: log-likelihoods of every choice, correctness, the gold's rank
            assert task["items"] == b["tasks"][name]["items"], (label, name)
            assert task["metrics"] == b["tasks"][name]["metrics"], (label, name)
        assert a == b, label  # and everything else (cross-entropies, diversity, drift)


@pytest.mark.slow  # ~40 s on 2 busy cores; the per-method checks below (3-7 s each) run by default
def test_swapped_adapters_score_like_fresh_loads_on_the_default_suite(make_cfg, monkeypatch):
    """Two LoRA runs of different ranks, two checkpoints each, in one eval process: identical
    per-item results to a fresh load per checkpoint; one base load instead of five."""
    runs, cfgs = [], []
    for r in (4, 8):
        cfg = make_cfg("method=lora", f"method.r={r}", "train.lr=5e-3", *SMOKE_FAST)
        cfgs.append(cfg)
        runs.append(fit(setup(cfg)))
    swapped, fresh, (n_swap, n_fresh), ways = _swap_then_fresh(runs, cfgs[0].eval, monkeypatch)
    assert (n_swap, n_fresh) == (1, 5)  # the base once, against the base + 4 checkpoints
    # one PeftModel wrap, then load_adapter/set_adapter/delete_adapter for the other three
    # (the ranks differ, the target modules are the same)
    assert ways == {"wraps": 1, "swaps": 3}
    _assert_identical(swapped, fresh)
    # the checks have teeth: every checkpoint scores differently from the base and each other
    lls = {k: v["tasks"]["lf_smoke_hellaswag"]["items"]["lls"] for k, v in swapped.items()}
    assert len({json.dumps(v) for v in lls.values()}) == len(lls) == 5


@pytest.mark.parametrize("method,extra", [
    ("dora", ["method.r=4"]),
    ("ia3", []),
    ("vera", ["method.r=16"]),
    ("loha", ["method.r=4"]),
    ("lora", ["method.r=4", "eval.precision=bf16"]),  # a cast model: the new adapter cast too
])
def test_swapping_across_methods_and_precisions(make_cfg, monkeypatch, method, extra):
    """A LoRA run and a run of `method` in one process (the second needs new adapter wrappers:
    peft's unload, then a fresh wrap of the same base), two checkpoints each."""
    lora = make_cfg("method=lora", "method.r=8", "train.lr=5e-3", *MC_ONLY, *extra[1:])
    other = make_cfg(f"method={method}", "train.lr=5e-3", *MC_ONLY, *extra)
    runs = [fit(setup(lora)), fit(setup(other))]
    swapped, fresh, (n_swap, n_fresh), ways = _swap_then_fresh(runs, other.eval, monkeypatch)
    assert (n_swap, n_fresh) == (1, 5)
    _assert_identical(swapped, fresh)
    # DoRA is peft's LORA type on the same modules: swapped in like LoRA. Another type needs
    # new wrappers: unload, then a fresh wrap for its first checkpoint, load_adapter for the next
    same = method in ("lora", "dora")
    assert ways == ({"wraps": 1, "swaps": 3} if same else {"wraps": 2, "swaps": 2})
    ppl = {k: v["ppl"]["target_heldout"]["ce"] for k, v in swapped.items()}
    assert len(set(ppl.values())) == 5  # the adapters were on


def test_methods_that_keep_a_fresh_load(make_cfg, monkeypatch):
    """Full-weight checkpoints are loaded as before, one load per checkpoint."""
    cfg = make_cfg("method=full", "train.lr=1e-3", *MC_ONLY)
    run = fit(setup(cfg))
    loads = _count_loads(monkeypatch)
    evaluate_runs([run], cfg.eval)
    assert loads["n"] == 1  # the base only: each full checkpoint is read from its own folder
    meta = json.loads((run / "eval" / "step-000001.json").read_text())["meta"]
    assert meta["adapter_load"] == "fresh"


def test_which_methods_share_the_base(make_cfg):
    expected = {"lora": True, "dora": True, "ia3": True, "vera": True, "loha": True,
                "full": False, "bitfit": False, "topk": False, "adapter": False, "qlora": False,
                "prefix": False, "prompt": False}
    got = {m: shares_base_in_eval(make_cfg(f"method={m}").method) for m in expected}
    assert got == expected


def test_swap_setting_is_checked_and_left_out_of_the_eval_key(make_cfg, tmp_path):
    from learnforget.eval.swap import swap_enabled

    cfg = make_cfg("method=lora", "eval=smoke")
    ev = cfg.eval
    off = ev.copy()
    off.swap_adapters = False
    older = OmegaConf.create({k: v for k, v in OmegaConf.to_container(ev).items()
                              if k != "swap_adapters"})
    keys = {eval_key(e, [], tmp_path, body_dtype="float32") for e in (ev, off, older)}
    assert len(keys) == 1  # results scored either way (or before the setting) stay valid
    bad = ev.copy()
    bad.swap_adapters = "yes"
    with pytest.raises(ConfigError, match="eval.swap_adapters must be true or false, got 'yes'"):
        swap_enabled(bad)
