"""The tiny demo, `learnforget demo --size tiny` (the study `demo_tiny`), end to end from its
real study file
(sweeps/demo_tiny.yaml: its launcher, train -> eval -> spectra per run, then `analyze: true`):
at its end the analysis table has every run and the figures exist. What to expect (jobs, run
folders, launcher, suite) is read from the study itself.

Made cheaper only through overrides the study accepts from the command line, as a user would
shorten it: one seed, one checkpoint at 2,048 tokens instead of 8k and 16k, 40 stdlib documents
instead of 400 (the held-out CE re-tokenises the corpus in every eval) and 2 items per task.
The method grid, stages, launcher, suite and analysis are the study's own. ~45 s on 2 shared
cores (3 jobs), so it is part of the default suite."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

from learnforget.studies.plan import expand
from learnforget.studies.study import find_study, load_study

CHEAP = ["seed=0", "train.checkpoints.at=[2048]", "data.max_docs=40", "data.heldout_docs=4",
         "eval.limit=2"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_demo_study_ends_with_the_analysis_of_all_its_runs(tmp_path, cache_dir):
    runs = tmp_path / "runs"
    overrides = [*CHEAP, f"paths.runs_dir={runs}", f"paths.cache_dir={cache_dir}"]
    study = load_study(find_study("demo_tiny"))
    assert study.analyze
    plan = expand(study, overrides)
    n, suite = len(plan.jobs), str(plan.jobs[0].cfg.eval.name)
    assert n >= 2 and {j.cfg.method.name for j in plan.jobs} >= {"full", "lora"}
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "learnforget.cli", "demo", "--size", "tiny",
                        *overrides], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    elapsed = time.perf_counter() - t0
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert f"launching {n} job(s) of study demo_tiny with {study.launcher}" in p.stdout
    assert f"study demo_tiny: {n}/{n} job(s) done" in p.stdout

    root = runs / study.experiment_name
    folders = sorted(f for f in root.iterdir() if f.name.startswith("tiny_llama-"))
    assert folders == sorted(j.run_dir for j in plan.jobs)
    for f in folders:
        assert json.loads((f / "run.json").read_text())["status"] == "finished"
        assert json.loads((f / "job.json").read_text())["stages"] == {
            "train": "done", "eval": "done", "spectra": "done"}

    out = root / "_analysis"
    with (out / "runs.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    table = {(r["run"], r["checkpoint"]) for r in rows}
    assert table == {(f.name, c) for f in folders for c in ("base", "token-000002048")}
    assert all(r["suite"] == suite and r["target_ce"] for r in rows)
    with (out / "spectra.csv").open() as fh:
        assert {r["run"] for r in csv.DictReader(fh)} == {f.name for f in folders}
    figures = ["learning_vs_forgetting", "learning_forgetting_vs_tokens", "random_matrices",
               "spectra/rank_vs_tokens"]
    for f in folders:  # one seed here: every run has its spectra figures
        figures += [f"spectra/rank_heatmap-{f.name}-token-000002048",
                    f"spectra/spectra_curves-{f.name}"]
    for stem in figures:
        png, svg = out / f"{stem}.png", out / f"{stem}.svg"
        assert png.read_bytes()[:8] == PNG and svg.stat().st_size > 1000, stem
    # the demo's summary: one table row per method setting (+ base), printed and written
    md = (out / "demo_table.md").read_text()
    settings = {str(j.cfg.method.name) for j in plan.jobs}
    table = md.split("\n\n")[1]
    assert table.count("\n| ") == 1 + n and "| base | 0 | 1 | - |" in table  # base, runs
    assert "code CE" in table and "tokens/param" in table
    assert all(s_ in table for s_ in ("full", "lora_r"))
    assert table.strip() in p.stdout and "figures:" in p.stdout
    # the three answers (learnforget.analysis.regime) per LoRA setting, from the per-block CE
    loras = sorted({r["method_summary"] for r in rows if r["method_summary"].startswith("lora")})
    answers = md.split("# The paper's three questions\n\n", 1)[1]
    assert [ln[3:] for ln in answers.splitlines() if ln.startswith("## ")] == [
        f"full vs {m}" for m in loras] + ["Cost"]  # the runs' wall and CPU hours last
    for q in ("1. does LoRA learn less?", "2. does LoRA forget less?",
              "3. which forgets less at matched learning?"):
        assert answers.count(f"| {q} |") >= len(loras), q
    assert answers.strip() in p.stdout
    assert len(settings) == 2
    print(f"demo --size tiny ({' '.join(CHEAP)}): {elapsed:.0f}s")
