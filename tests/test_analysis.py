"""The analysis stage: table, Pareto front, figures, `analyze`, the notebooks, the benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, OFFLINE_DATA

from learnforget.analysis.collect import collect, pareto_front
from learnforget.analysis.stage import analyze
from learnforget.config import compose
from learnforget.errors import ConfigError
from learnforget.runfolder import find_runs
from learnforget.train.loop import fit, setup

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "analysis").glob("*.py"))
# notebooks whose inputs these made-up runs do not have (sampled HumanEval generations, the
# transfer study's runs): the line each prints instead (their tables and figures:
# tests/test_diversity.py, tests/test_transfer.py)
WITHOUT_FIXTURE_DATA = {"diversity": "no diversity results under",
                        "transfer": "no transfer runs under"}
# made-up scores per method at (base, step 1, step 2): full learns and forgets most
SCORES = {
    "full": [(0.20, 0.60, 2.00, 3.00), (0.40, 0.52, 1.60, 3.30), (0.55, 0.45, 1.30, 3.60)],
    "lora": [(0.20, 0.60, 2.00, 3.00), (0.30, 0.58, 1.80, 3.05), (0.38, 0.57, 1.65, 3.10)],
}


def write_summary(run: Path, scores, suite: str = "offline") -> None:
    rows = []
    base = scores[0]
    labels = ["base"] + sorted(p.name for p in (run / "checkpoints").iterdir())
    for label, (tgt, fgt, tce, fce) in zip(labels, scores, strict=True):
        m = json.loads((run / "checkpoints" / label / "manifest.json").read_text()) \
            if label != "base" else {"step": 0, "tokens": 0}
        rows.append({"checkpoint": label, "step": m["step"], "tokens": m["tokens"],
                     "target_score": tgt, "forgetting_score": fgt,
                     "target_score_chance_corrected": (tgt - 0.25) / 0.75,
                     "forgetting_score_chance_corrected": None,
                     "target_ce": tce, "forgetting_ce": fce,
                     "delta/target_score": tgt - base[0], "delta/forgetting_score": fgt - base[1],
                     "delta/target_ce": tce - base[2], "delta/forgetting_ce": fce - base[3],
                     "task/arith": tgt, "ce/shakespeare": fce})
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / f"summary-{suite}.json").write_text(
        json.dumps({"run": run.name, "suite": suite, "rows": rows}))


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, cache_dir) -> Path:
    """A runs root like `learnforget train` leaves it (the make_cfg settings: 2 steps,
    checkpoints after step 1 and 2) plus hand-written eval summaries; the DoRA run has none."""
    root = tmp_path_factory.mktemp("analysis") / "runs"
    for method in ("full", "lora", "dora"):
        cfg = compose([f"paths.runs_dir={root}", f"paths.cache_dir={cache_dir}",
                       "data=stdlib_code", *FAST, *OFFLINE_DATA["stdlib_code"],
                       f"method={method}", "method.r=4", "train.lr=1e-2",
                       "train.precision=fp32"])
        run = fit(setup(cfg))
        if method in SCORES:
            write_summary(run, SCORES[method])
    (root / "_base" / "tiny_llama").mkdir(parents=True)  # shared base scores: not a run
    return root


# ------------------------------------------------------------------ collect

def test_collect_skips_and_reports_a_run_without_eval(runs_root, capsys):
    df = collect(runs_root)
    assert len(find_runs(runs_root)) == 3
    assert sorted(df["method"].unique()) == ["full", "lora"]
    assert len(df) == 6  # 2 runs x (base + 2 checkpoints)
    (warning,) = df.attrs["warnings"]
    assert "dora" in warning and "eval" in warning
    assert "dora" in capsys.readouterr().err
    base = df[df["checkpoint"] == "base"]
    assert (base["tokens"] == 0).all() and (base["step"] == 0).all()
    lora = df[(df["method"] == "lora")].sort_values("tokens")
    assert list(lora["checkpoint"]) == ["base", "step-000001", "step-000002"]
    assert list(lora["tokens"]) == [0, 64, 128]
    assert lora["rank"].iloc[0] == 4 and lora["alpha"].iloc[0] == 8
    assert lora["targets"].iloc[0] == "all" and lora["regime"].iloc[0] == "cpt"
    assert lora["delta/target_score"].iloc[-1] == pytest.approx(0.18)
    assert lora["epoch"].iloc[0] == 0 and lora["epoch"].iloc[-1] > 0
    full = df[df["method"] == "full"]
    assert pd.isna(full["rank"]).all()
    assert (full["trainable_params"] == full["total_params"]).all()
    assert (lora["trainable_params"] < lora["total_params"]).all()
    assert (df["peak_mem_mb"] > 0).all() and (df["wall_time_s"] > 0).all()
    for col in ("run", "experiment", "model", "data", "seed", "checkpoint", "target_ce",
                "forgetting_ce", "delta/forgetting_ce", "task/arith", "suite"):
        assert col in df.columns
    assert df["forgetting_score_chance_corrected"].isna().all()  # nulls stay missing



def test_collect_reports_many_unscored_runs_in_one_line(runs_root, tmp_path, capsys):
    """A train-only study (sweeps/transfer.yaml: 39 runs, no eval stage) gave one warning per
    run; more than three unscored runs are now one line with their count and an example."""
    import shutil

    root = tmp_path / "runs"
    for run in find_runs(runs_root):
        copies = 4 if "dora" in run.name else 1
        for i in range(copies):
            shutil.copytree(run, root / f"{run.name}-{i}")
    df = collect(root)
    assert sorted(df["method"].unique()) == ["full", "lora"]
    (warning,) = df.attrs["warnings"]
    assert warning.startswith("4 runs have no eval summary (eval/summary-*.json): skipped (e.g. ")
    assert "dora" in warning
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

def test_collect_on_an_empty_or_missing_root_is_a_config_error(tmp_path):
    empty = tmp_path / "empty_runs"
    (empty / "_base").mkdir(parents=True)
    with pytest.raises(ConfigError, match="empty_runs"):
        collect(empty)
    with pytest.raises(ConfigError, match="nowhere"):
        collect(tmp_path / "nowhere")


# ------------------------------------------------------------------ Pareto front

def test_pareto_front_of_a_hand_made_point_set():
    x = [1, 2, 3, 2, 3, 0, 1, np.nan, 3]
    y = [5, 4, 3, 2, 3, 6, 4, 9, 1]
    # (3,3) twice: only the first; (2,2), (1,4), (3,1) dominated; NaN never on the front
    expected = [True, True, True, False, False, True, False, False, False]
    assert pareto_front(x, y).tolist() == expected
    # forgetting as cross-entropy: lower is better
    assert pareto_front([1, 2, 3, 3], [1, 2, 3, 2], y_better="lower").tolist() == \
        [True, False, False, True]
    df = pd.DataFrame({"target_score": [1, 2, 3, 3], "forgetting_ce": [1, 2, 3, 2],
                       "forgetting_score": [1, 2, 3, 2]})
    assert pareto_front(df, "target_score", "forgetting_ce").tolist() == [True, False, False, True]
    assert pareto_front(df, "target_score", "forgetting_score").tolist() == \
        [False, False, True, False]
    assert pareto_front([1.0], [1.0]).tolist() == [True]
    assert pareto_front([], []).tolist() == []
    # deterministic: the mask does not depend on the order of the points
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 5, size=(40, 2)).astype(float)
    mask = pareto_front(pts[:, 0], pts[:, 1])
    perm = rng.permutation(40)
    on = {tuple(p) for p in pts[mask]}
    assert {tuple(p) for p in pts[perm][pareto_front(pts[perm, 0], pts[perm, 1])]} == on
    assert len(on) == mask.sum()  # no duplicate point twice
    for i in range(40):  # brute force: on the front iff nothing dominates it
        dominated = any((pts[j] >= pts[i]).all() and (pts[j] > pts[i]).any() for j in range(40))
        assert (tuple(pts[i]) in on) == (not dominated)


# ------------------------------------------------------------------ analyze + notebooks

def _nonempty(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 1000


def test_analyze_writes_table_figures_and_spectra(runs_root, tmp_path):
    from learnforget.analysis.stage import analyze

    out = tmp_path / "analysis_out"
    res = analyze(runs_root, out, random_n=100, verbose=False)
    assert res["out"] == out and res["n_rows"] == 6
    names = {p.name for p in res["figures"]}
    for stem in ("learning_vs_forgetting", "learning_vs_forgetting_ce",
                 "learning_forgetting_vs_tokens", "rank_vs_tokens", "random_matrices"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names, stem
    assert sum(n.startswith("rank_heatmap-") and n.endswith(".png") for n in names) == 3
    assert sum(n.startswith("spectra_curves-") and n.endswith(".png") for n in names) == 3
    assert all(_nonempty(p) for p in res["figures"])
    table = pd.read_csv(out / "runs.csv")
    assert len(table) == 6 and (out / "runs.parquet").exists()
    assert len(res["spectra"]) == 6  # 3 runs x 2 checkpoints, the uneval'd DoRA run included
    assert any("dora" in w for w in res["warnings"])
    spectra = pd.read_csv(out / "spectra.csv")
    assert set(spectra["method"]) == {"full", "lora", "dora"}
    lora = spectra[spectra["method"] == "lora"]
    assert len(lora) == 2 * 14 and (lora["rank_for_variance"] <= 4).all()
    assert (spectra.loc[spectra["method"] == "full", "rank_for_variance"] > 4).any()
    # the follow-ups: forgetting at matched learning (full vs LoRA), intruder dimensions
    assert {p.name for p in res["tables"]} >= {"matched_learning.csv", "matched_learning.md",
                                               "intruders.csv", "intruders.md"}
    matched = pd.read_csv(out / "matched_learning.csv")
    assert list(matched[["method_a", "method_b"]].iloc[0]) == ["full", "lora_r4_a8_all"]
    assert set(matched["quantity"]) == {"forgetting at matched learning",
                                        "learning at matched forgetting"}
    intr = pd.read_csv(out / "intruders.csv")
    assert set(intr["method_summary"]) >= {"full", "lora_r4_a8_all"}
    assert intr["intruders"].between(0, 10).all() and intr["chance_intruders"].between(0, 10).all()
    assert {"intruders_vs_rank.png", "intruders_vs_tokens.png"} <= names
    # each rank for 90% beside a Gaussian matrix's of the module's shape
    from learnforget.analysis.noise_baseline import gaussian_rank_for_variance

    ctx = pd.read_csv(out / "rank_vs_gaussian.csv")
    q = ctx[(ctx["module_type"] == "q_proj")].iloc[0]
    assert q["gaussian_rank_for_variance"] == gaussian_rank_for_variance((64, 64))
    assert "gaussian_rank_for_variance" in pd.read_csv(out / "spectra.csv").columns


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless_and_writes_figures(notebook, runs_root, tmp_path):
    out = tmp_path / "nb_out"
    env = {**os.environ, "MPLBACKEND": "Agg", "LEARNFORGET_RUNS_DIR": str(runs_root),
           "LEARNFORGET_ANALYSIS_OUT": str(out), "LEARNFORGET_RANDOM_N": "120",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(notebook)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if notebook.stem in WITHOUT_FIXTURE_DATA:  # its inputs are not in these runs: it says so
        assert WITHOUT_FIXTURE_DATA[notebook.stem] in proc.stdout, proc.stdout[-2000:]
        assert not list(out.rglob("*.png"))
        return
    pngs = sorted(out.rglob("*.png"))
    svgs = sorted(out.rglob("*.svg"))
    assert pngs and len(pngs) == len(svgs)
    assert all(_nonempty(p) for p in pngs + svgs)
    expected = {"pareto": ["learning_vs_forgetting.png", "learning_forgetting_vs_tokens.png"],
                "spectra": ["rank_vs_tokens.png"], "random_matrices": ["random_matrices.png"],
                "regularisers": ["regularisers_learning_vs_forgetting.png"]}
    for name in expected.get(notebook.stem, []):
        assert any(p.name == name for p in pngs), (name, [p.name for p in pngs])
    if notebook.stem == "spectra":
        assert sum(p.name.startswith("rank_heatmap-") for p in pngs) == 3
        assert "phi=" in proc.stdout  # LoRA vs full subspace similarity printed


def test_notebooks_are_jupytext_percent_files():
    assert {p.stem for p in NOTEBOOKS} >= {"pareto", "spectra", "random_matrices"}
    for p in NOTEBOOKS:
        text = p.read_text()
        assert "format_name: percent" in text and text.count("# %%") >= 3
        assert "LEARNFORGET_RUNS_DIR" in text


# ------------------------------------------------------------------ benchmark

def test_bench_spectra_small():
    from learnforget.analysis.stage import bench_spectra

    res = bench_spectra(layers=2, rank=8, modules=(("q_proj", 96, 96), ("up_proj", 160, 96),
                                                   ("down_proj", 96, 160)), verbose=False)
    assert res["n_modules"] == 6 and res["factor_route_total_s"] > 0
    assert res["fast_vs_dense_max_rel_diff"] < 1e-5
    assert res["dense_tail_over_top"] < 1e-5
    assert len(set(res["rank90_fast_dense_gram"])) == 1
    assert res["rect_shape"] == [96, 160]
    assert res["rect_rank90_svd_gram"][0] == res["rect_rank90_svd_gram"][1]


def test_cli_entry_points(runs_root, tmp_path, capsys):
    from learnforget.analysis.stage import analyze_cli, bench_cli

    out = tmp_path / "cli_out"
    assert analyze_cli([str(runs_root), "--out", str(out), "--no-spectra", "--random-n", "0"]) == 0
    assert _nonempty(out / "learning_vs_forgetting.png") and (out / "runs.csv").exists()
    assert str(out / "runs.csv") in capsys.readouterr().out
    with pytest.raises(ConfigError, match="bench spectra"):
        bench_cli(["nonsense"])
    with pytest.raises(ConfigError, match="no run folders"):
        analyze_cli([str(tmp_path / "cli_out")])


def test_collect_wandb_builds_the_table_from_a_group():
    from types import SimpleNamespace

    from learnforget.analysis.collect import collect_wandb

    train = SimpleNamespace(name="r1", job_type="train",
                            config={"method": {"name": "lora", "r": 8}, "model": {"name": "m"},
                                    "data": {"name": "d"}, "seed": 1})
    ev = SimpleNamespace(name="r1", job_type="eval", config={},
                         scan_history=lambda: [{"tokens": 0, "target_score": 0.1, "_step": 0},
                                               {"tokens": 64, "target_score": 0.3, "_step": 1}])
    calls = {}

    class Api:
        def runs(self, path, filters):
            calls["args"] = (path, filters)
            return [train, ev]

    df = collect_wandb("study", api=Api())
    assert calls["args"] == ("learnforget", {"group": "study"})
    assert list(df["tokens"]) == [0, 64] and list(df["target_score"]) == [0.1, 0.3]
    assert set(df["method"]) == {"lora"} and set(df["rank"]) == {8} and "_step" not in df


def test_learning_axis_skips_a_target_score_that_never_moves():
    from learnforget.analysis.figures import learning_column

    flat = pd.DataFrame({"target_score": [0.0, 0.0, 0.0], "target_ce": [2.5, 2.4, 2.3]})
    assert learning_column(flat) == "target_ce"
    moving = flat.assign(target_score=[0.0, 0.1, 0.2])
    assert learning_column(moving) == "target_score"
    assert learning_column(flat.drop(columns="target_ce")) == "target_score"
    assert learning_column(flat, "target_score") == "target_score"


# ------------------------------------------------------------------ the analysis in W&B

def _wandb_blob(run_dir: Path, expected: tuple[bytes, ...]) -> bytes:
    """The bytes of an offline W&B run (its records land shortly after finish() returns)."""
    import time

    deadline = time.monotonic() + 60
    while True:
        blob = b"".join(f.read_bytes() for f in run_dir.rglob("*") if f.is_file())
        if all(e in blob for e in expected) or time.monotonic() > deadline:
            return blob
        time.sleep(0.5)


def test_analysis_goes_to_one_wandb_run_in_the_study_group(make_cfg, monkeypatch):
    """Runs that mirrored to W&B get an analysis run (job_type analysis) in their group with
    the study's table (wandb.Table) and the figures (wandb.Image), offline without a key."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = fit(setup(make_cfg("logger=wandb", "experiment_name=study5", "method.r=4")))
    write_summary(run, SCORES["lora"])
    root = run.parent
    res = analyze(root, random_n=0, spectra=False, verbose=False)
    (wb,) = list(res["wandb"].glob("offline-run-*"))
    assert res["wandb"] == root / "_analysis" / "wandb"
    expected = (b"study5", b"analysis", b"table/runs", b"figure/learning_vs_forgetting")
    blob = _wandb_blob(wb, expected)
    for e in expected:
        assert e in blob, e
    tables = list(wb.rglob("table/runs*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == 3 and "forgetting_score" in table["columns"]
    assert list(wb.rglob("figure/learning_vs_forgetting*.png"))
    assert not (run / "wandb" / "analysis").exists()


def test_analysis_wandb_is_forced_skipped_or_fails_softly(runs_root, tmp_path, monkeypatch,
                                                         capsys):
    """Runs without W&B: no analysis run unless --wandb; a failing W&B only warns."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "an"
    assert analyze(runs_root, out, random_n=0, spectra=False, verbose=False)["wandb"] is None
    assert not (out / "wandb").exists()

    def refuse(**kwargs):
        raise wandb.errors.CommError("could not reach api.wandb.ai")

    monkeypatch.setattr(wandb, "init", refuse)
    res = analyze(runs_root, out, random_n=0, spectra=False, verbose=False, wandb=True)
    assert res["wandb"] is None and (out / "runs.csv").exists()
    err = [x for x in capsys.readouterr().err.splitlines() if "W&B mirror off" in x]
    assert len(err) == 1 and "CommError: could not reach api.wandb.ai" in err[0]
