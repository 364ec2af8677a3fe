"""The ablation studies (sweeps/lora_which_matrices, lora_rank_ablation, qlora_dtypes,
prefix_prompt_length): their grids, the `grid:`/`sizes:` study keys they use, the dry run's
memory table, the quantisation error of a QLoRA base (nf4, fp4, int8), and the rank ablation
end to end at toy scale on this CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, OFFLINE_DATA

from learnforget.config import compose
from learnforget.errors import ConfigError
from learnforget.studies.command import sweep_cli, sweep_main
from learnforget.studies.plan import estimate, expand
from learnforget.studies.report import memory_table
from learnforget.studies.study import apply_size, find_study, load_study

LLAMA_D, LLAMA_LAYERS = 4096, 32
STUDIES = {"lora_which_matrices": 7, "lora_rank_ablation": 15, "qlora_dtypes": 7,
           "prefix_prompt_length": 20}


def _plan(name: str, runs: Path, size: str | None = None, extra=()):
    study, overrides = apply_size(load_study(find_study(name)), size,
                                  [f"paths.runs_dir={runs}", *extra])
    plan = expand(study, overrides)
    estimate(plan)
    return plan


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- the grids

def test_which_matrices_lists_seven_settings_with_one_parameter_budget(tmp_path, capsys):
    t0 = time.perf_counter()
    assert sweep_cli(["lora_which_matrices", "--dry-run", f"paths.runs_dir={tmp_path}"]) == 0
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert "7 combinations -> 7 jobs" in out and "states: 0 done, 0 running, 0 resume, 7 new" in out
    assert "grid: 7 settings" in out and "memory per job" in out
    assert elapsed < 60, elapsed  # seconds: composition plus 7 meta-device parameter counts
    plan = _plan("lora_which_matrices", tmp_path)
    assert [j.params for j in plan.jobs] == [
        ["method.targets=[q_proj]", "method.r=8"],
        ["method.targets=[k_proj]", "method.r=8"],
        ["method.targets=[v_proj]", "method.r=8"],
        ["method.targets=[o_proj]", "method.r=8"],
        ["method.targets=[q_proj,k_proj]", "method.r=4"],
        ["method.targets=[q_proj,v_proj]", "method.r=4"],
        ["method.targets=[q_proj,k_proj,v_proj,o_proj]", "method.r=2"],
    ]
    for j in plan.jobs:
        c = j.cfg
        assert (c.model.name, c.method.name, c.data.name, c.eval.name) == (
            "llama2_7b", "lora", "metamathqa", "paper")
        assert c.method.r * len(c.method.targets) == 8
    rows = memory_table(plan)  # param_report on llama2_7b, meta device
    budget = 8 * 2 * LLAMA_D * LLAMA_LAYERS
    assert [r["trainable"] for r in rows] == [budget] * 7 == [2_097_152] * 7
    assert out.count("2,097,152") >= 7
    assert len({j.run_dir for j in plan.jobs}) == 7


def test_rank_ablation_lists_fifteen_jobs(tmp_path, capsys, monkeypatch):
    from learnforget.train import params

    calls = []
    real = params.param_report

    def counted(cfg, activations=True, device="cpu"):
        calls.append(activations)
        return real(cfg, activations=activations, device=device)

    monkeypatch.setattr(params, "param_report", counted)
    monkeypatch.setattr(params, "_REPORTS", {})
    assert sweep_cli(["lora_rank_ablation", "--dry-run", f"paths.runs_dir={tmp_path}"]) == 0
    # one traced report per job (15 distinct ranks x targets), shared by the fit and memory tables
    assert calls == [True] * 15
    out = capsys.readouterr().out
    assert "15 combinations -> 15 jobs (0 duplicate(s) merged" in out
    plan = _plan("lora_rank_ablation", tmp_path)
    assert len(plan.jobs) == 15
    assert plan.jobs[0].params == ["method.targets=[q_proj]", "method.r=1"]
    assert plan.jobs[-1].params == ["method.targets=[q_proj,k_proj,v_proj,o_proj]", "method.r=64"]
    got = {(tuple(j.cfg.method.targets), j.cfg.method.r) for j in plan.jobs}
    assert got == {(t, r) for t in [("q_proj",), ("q_proj", "v_proj"),
                                    ("q_proj", "k_proj", "v_proj", "o_proj")]
                   for r in (1, 2, 4, 8, 64)}
    for j, row in zip(plan.jobs, memory_table(plan), strict=True):  # cached: no new report
        want = j.cfg.method.r * 2 * LLAMA_D * LLAMA_LAYERS * len(j.cfg.method.targets)
        assert row["trainable"] == want
        assert row["peak_mib"] is None  # nothing has run
    assert len(calls) == 15
    assert sum(j.gpu_hours for j in plan.jobs) == pytest.approx(232.0, abs=0.1)
    assert "GPU-hours: 232.0 in all" in out


def test_qlora_dtypes_lists_seven_bases_and_their_memory(tmp_path, capsys):
    assert sweep_cli(["qlora_dtypes", "--dry-run", f"paths.runs_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "7 combinations -> 7 jobs" in out
    plan = _plan("qlora_dtypes", tmp_path)
    settings = [(j.cfg.method.name, j.cfg.model.dtype, j.cfg.method.quant_type,
                 j.cfg.method.double_quant) for j in plan.jobs]
    assert [s[:2] for s in settings[:2]] == [("lora", "bfloat16"), ("lora", "float32")]
    assert [(m, q, dq) for m, _, q, dq in settings[2:6]] == [
        ("qlora", "nf4", True), ("qlora", "nf4", False), ("qlora", "fp4", True),
        ("qlora", "fp4", False)]
    assert settings[6][0] == "qlora" and settings[6][2] == "int8"
    assert plan.jobs[1].cfg.train.precision == "fp32" and plan.jobs[0].cfg.train.precision == "bf16"
    assert "double_quant" not in plan.jobs[6].run_dir.name and "int8" in plan.jobs[6].run_dir.name
    rows = {r["base"]: r for r in memory_table(plan)}
    assert set(rows) == {"bfloat16", "float32", "nf4+dq", "nf4", "fp4+dq", "fp4", "int8"}
    assert len({r["trainable"] for r in rows.values()}) == 1  # the same adapter everywhere
    mib = {k: r["est_mib"] for k, r in rows.items()}
    assert mib["float32"] > mib["bfloat16"] > mib["int8"] > mib["nf4"] > mib["nf4+dq"]
    assert mib["nf4"] == mib["fp4"] and mib["nf4+dq"] == mib["fp4+dq"]
    gpu = [j.gpu_hours for j in plan.jobs]
    assert gpu[1] > gpu[6] > gpu[2] > gpu[0]  # fp32 slowest, then int8, 4-bit, bf16


def test_prefix_prompt_length_lists_twenty_jobs_with_their_lrs(tmp_path, capsys):
    assert sweep_cli(["prefix_prompt_length", "--dry-run", f"paths.runs_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "20 combinations -> 20 jobs" in out
    plan = _plan("prefix_prompt_length", tmp_path)
    seen = {}
    for j in plan.jobs:
        m = j.cfg.method
        variant = (m.name, bool(m.prefix_projection) if m.name == "prefix" else m.prompt_init)
        seen.setdefault(variant, []).append(m.num_virtual_tokens)
        want_lr = {("prompt", "random"): 3e-2, ("prompt", "text"): 3e-2,
                   ("prefix", False): 1e-2, ("prefix", True): 1e-4}[variant]
        assert j.cfg.train.lr == pytest.approx(want_lr)
    assert seen == {v: [1, 5, 20, 100, 200] for v in [("prefix", False), ("prefix", True),
                                                      ("prompt", "random"), ("prompt", "text")]}
    assert plan.jobs[0].cfg.method.prompt_init_text.startswith("Solve the following")
    rows = memory_table(plan)
    mlp = [r["trainable"] for j, r in zip(plan.jobs, rows, strict=True)
           if j.cfg.method.name == "prefix" and j.cfg.method.prefix_projection]
    assert min(mlp) > 1_000_000_000  # the reparametrisation MLP
    prompt = {j.cfg.method.num_virtual_tokens: r["trainable"]
              for j, r in zip(plan.jobs, rows, strict=True) if j.cfg.method.name == "prompt"}
    assert prompt == {n: n * LLAMA_D for n in (1, 5, 20, 100, 200)}


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_study_has_a_toy_size_on_the_tiny_llama(name, tmp_path):
    full = _plan(name, tmp_path)
    toy = _plan(name, tmp_path, size="toy")
    assert len(full.jobs) == len(toy.jobs) == STUDIES[name]
    assert full.study.launcher == "submitit_slurm" and toy.study.launcher == "basic"
    assert {j.cfg.model.name for j in full.jobs} == {"llama2_7b"}
    assert {j.cfg.model.name for j in toy.jobs} == {"tiny_llama"}
    assert {j.cfg.data.name for j in toy.jobs} == {"arith_ift"}
    assert {j.run_dir.parent.name for j in toy.jobs} == {f"{name}_toy"}
    assert toy.study.cost == 0 and all(j.gpu_hours == 0 for j in toy.jobs)
    assert all(j.gpu_hours > 0 for j in full.jobs)


# ---------------------------------------------------------------------------- grid and sizes

def test_grid_crosses_explicit_settings_with_the_sweep_axes(tmp_path):
    study = _write(tmp_path / "g.yaml", """
description: paired settings x seeds
holds: [model=tiny_llama, method=lora]
grid:
  - {method.targets: [q_proj], method.r: 8}
  - {method.targets: [q_proj, v_proj], method.r: 4}
  - {method.targets: all, method.r: "1,2"}
sweep:
  seed: [0, 1]
rules:
  - match: {method.r: 4}
    set: {method.dropout: 0.1}
exclude: [{method.r: 2, seed: 1}]
""")
    plan = expand(load_study(study), [f"paths.runs_dir={tmp_path}"])
    assert plan.combinations == 8 and plan.excluded == 1 and len(plan.jobs) == 7
    got = [(list(j.cfg.method.targets) if not isinstance(j.cfg.method.targets, str)
            else j.cfg.method.targets, j.cfg.method.r, j.cfg.seed, j.cfg.method.dropout)
           for j in plan.jobs]
    assert got == [(["q_proj"], 8, 0, 0.05), (["q_proj"], 8, 1, 0.05),
                   (["q_proj", "v_proj"], 4, 0, 0.1), (["q_proj", "v_proj"], 4, 1, 0.1),
                   ("all", 1, 0, 0.05), ("all", 1, 1, 0.05), ("all", 2, 0, 0.05)]
    # a command-line value for a grid key applies to every setting (duplicates merge)
    plan = expand(load_study(study), [f"paths.runs_dir={tmp_path}", "method.r=2"])
    assert {j.cfg.method.r for j in plan.jobs} == {2}


@pytest.mark.parametrize("text, match", [
    ("grid: {method.r: 8}\n", "grid must be a non-empty list"),
    ("grid: []\n", "grid must be a non-empty list"),
    ("grid: [{method.r: 8}]\nsweep: {method.r: [1, 2]}\n", r"grid\[0\] sets \['method.r'\]"),
    ("sizes: {toy: {overrides: [model=tiny_llama], launcher: nowhere}}\n", "launcher 'nowhere'"),
    ("sizes: {toy: {overides: [model=tiny_llama]}}\n", "unknown key"),
])
def test_bad_grid_or_size_is_an_error(tmp_path, text, match):
    study = _write(tmp_path / "bad.yaml", "description: bad\n" + text)
    with pytest.raises(ConfigError, match=match):
        load_study(study)


def test_unknown_size_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no size 'huge'.*toy"):
        sweep_main("lora_rank_ablation", [f"paths.runs_dir={tmp_path}"], size="huge",
                   dry_run=True)
    with pytest.raises(ConfigError, match="no size 'toy'"):
        sweep_main("demo_tiny", [f"paths.runs_dir={tmp_path}"], size="toy", dry_run=True)


# ---------------------------------------------------------------------------- quantisation

def _int8_on_cpu() -> str | None:
    """Why LLM.int8 cannot run here (None when it can)."""
    try:
        import bitsandbytes.functional as bnbf

        cb, scb, _ = bnbf.int8_vectorwise_quant(torch.randn(32, 32, dtype=torch.float16))
        bnbf.int8_vectorwise_dequant(cb, scb)
    except Exception as e:  # the installed bitsandbytes has no CPU int8 kernels
        return f"bitsandbytes LLM.int8 does not run on this CPU: {type(e).__name__}: {e}"
    return None


def _quantised(cfg, cache_dir):
    from learnforget.assets.models import load_model

    model, _, path = load_model(cfg.model, cfg.method, cache_dir)
    return model, path


def test_quantisation_error_nf4_below_fp4_and_equal_to_a_direct_round_trip(make_cfg, cache_dir):
    """tiny_llama's weights are N(0, 0.02): NF4's levels (normal quantiles) fit them better
    than FP4's; int8 (256 levels per row) is far below both. Double quantisation only
    quantises the per-block scales, so it changes the error a little, not the order."""
    from safetensors.torch import load_file

    from learnforget.methods.quantisation import quantisation_error, quantise_dequantise

    errors = {}
    kinds = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
    if _int8_on_cpu() is None:
        kinds.append(("int8", False))
    for qt, dq in kinds:
        cfg = make_cfg("method=qlora", f"method.quant_type={qt}", f"method.double_quant={dq}")
        model, path = _quantised(cfg, cache_dir)
        rep = quantisation_error(model, path, quant_type=qt, double_quant=dq)
        assert rep["n_layers"] == 14 and not rep["missing"]  # 2 blocks x (4 attention + 3 MLP)
        assert all(0 < e < 1 for e in rep["layers"].values())
        assert rep["mean_rel_error"] == pytest.approx(sum(rep["layers"].values()) / 14)
        assert rep["max_rel_error"] >= rep["mean_rel_error"]
        errors[(qt, dq)] = rep
        if (qt, dq) in (("nf4", True), ("int8", False)):  # what the layer holds = a round trip
            weights = load_file(str(Path(path) / "model.safetensors"))
            name = "model.layers.0.self_attn.q_proj"
            w = weights[f"{name}.weight"]
            direct = float((w - quantise_dequantise(w, qt, dq)).norm() / w.norm())
            assert rep["layers"][name] == pytest.approx(direct, rel=1e-5)
    nf4, fp4 = errors[("nf4", True)]["mean_rel_error"], errors[("fp4", True)]["mean_rel_error"]
    assert nf4 < fp4, (nf4, fp4)
    assert errors[("nf4", False)]["mean_rel_error"] < errors[("fp4", False)]["mean_rel_error"]
    for k in errors:  # layer by layer too
        if k[0] == "nf4":
            other = errors[("fp4", k[1])]["layers"]
            assert all(v < other[n] for n, v in errors[k]["layers"].items())
    assert 0.05 < nf4 < 0.2 and fp4 < 0.3  # 4-bit: about 10% of the weight's norm
    if ("int8", False) in errors:
        assert errors[("int8", False)]["mean_rel_error"] < nf4 / 5


def test_quant_type_is_validated(make_cfg):
    from learnforget.config import validate

    with pytest.raises(ConfigError, match="quant_type must be one of nf4, fp4, int8"):
        validate(make_cfg("method=qlora", "method.quant_type=int4"))
    cfg = make_cfg("method=qlora", "method.quant_type=int8", "method.double_quant=false")
    same = make_cfg("method=qlora", "method.quant_type=int8", "method.double_quant=true")
    from learnforget.config import run_dir

    assert run_dir(cfg) == run_dir(same)  # int8 ignores double_quant: one run


def test_qlora_int8_trains_on_cpu_and_records_the_quantisation_error(make_cfg):
    reason = _int8_on_cpu()
    if reason:
        pytest.skip(reason)
    from learnforget.train.loop import train

    out = train(make_cfg("method=qlora", "method.quant_type=int8", "method.r=4"))
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished"
    q = info["train"]["quantisation"]
    assert q["quant_type"] == "int8" and "double_quant" not in q and q["n_layers"] == 14
    assert 0 < q["mean_rel_error"] < 0.02
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert "int8" in out.name and "_dq" not in out.name


# ---------------------------------------------------------------------------- end to end

def test_rank_ablation_runs_at_toy_scale_and_reports_memory(tmp_path, cache_dir, capsys):
    """The 15 jobs of lora_rank_ablation --size toy on tiny_llama (2 steps each, held-out CE
    only), then the dry run lists the measured peak next to every estimate."""
    from learnforget.analysis.collect import collect

    runs = tmp_path / "runs"
    extra = [f"paths.runs_dir={runs}", f"paths.cache_dir={cache_dir}", *FAST,
             *OFFLINE_DATA["arith_ift"], "eval.tasks=[]", "stages=[train,eval]"]
    t0 = time.perf_counter()
    assert sweep_main("lora_rank_ablation", extra, size="toy", launcher="basic",
                      analyze=False) == 0
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert "launching 15 job(s)" in out and "15/15 job(s) done" in out
    root = runs / "lora_rank_ablation_toy"
    folders = sorted(p for p in root.iterdir() if not p.name.startswith("_"))
    assert len(folders) == 15
    ranks = set()
    for f in folders:
        info = json.loads((f / "run.json").read_text())
        assert info["status"] == "finished" and info["run"]["model"] == "tiny_llama"
        ms = info["run"]["method_settings"]
        ranks.add((tuple(ms["targets"]), ms["r"]))
        assert info["train"]["trainable_params"] == ms["r"] * 2 * 64 * 2 * len(ms["targets"])
        assert (f / "eval" / "summary-smoke.json").exists()
    assert len(ranks) == 15

    df = collect(root, verbose=False)
    last = df[df["checkpoint"] != "base"].sort_values("step").groupby("run").tail(1)
    assert len(last) == 15 and last["target_ce"].notna().all()
    assert sorted(last["rank"].tolist()) == sorted([1, 2, 4, 8, 64] * 3)

    assert sweep_main("lora_rank_ablation", extra, size="toy", dry_run=True) == 0
    out = capsys.readouterr().out
    assert "states: 15 done, 0 running, 0 resume, 0 new" in out
    study, overrides = apply_size(load_study(find_study("lora_rank_ablation")), "toy", extra)
    plan = expand(study, overrides)
    rows = memory_table(plan)
    assert len(rows) == 15
    for r in rows:
        assert r["peak_mib"] and r["peak_mib"] > 0 and r["trainable"] == r["trainable_run"]
        assert r["est_mib"] > 0
    table = out.split("memory per job")[1].splitlines()[2:17]
    assert len(table) == 15 and all(line.split()[-1] != "-" for line in table)
    assert elapsed < 120, elapsed


def test_compose_of_a_toy_job_matches_the_listing(tmp_path):
    """What a toy job composes to is what `learnforget job` gets (the listing's overrides)."""
    plan = _plan("qlora_dtypes", tmp_path, size="toy")
    job = plan.jobs[-1]
    cfg = compose(job.overrides)
    assert cfg.method.name == "qlora" and cfg.method.quant_type == "int8"
    assert cfg.method.compute_dtype == "float32" and cfg.model.name == "tiny_llama"
