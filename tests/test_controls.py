"""The positive controls: scaled checkpoints (forgetting), power by simulation, facts recall."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from learnforget.errors import ConfigError

# ------------------------------------------------------------------ forgetting: θ0 + t·ΔW


def test_scaled_state_matches_numpy():
    from learnforget.analysis.controls import scaled_state

    rng = np.random.default_rng(0)
    w0, w1 = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    base = {"w": torch.tensor(w0, dtype=torch.float32)}
    ckpt = {"w": torch.tensor(w1, dtype=torch.float32)}
    b32, c32 = w0.astype(np.float32).astype(np.float64), w1.astype(np.float32).astype(np.float64)
    for t in (0.0, 0.5, 1.0, 4.0):
        got = scaled_state(base, ckpt, t)["w"].numpy()
        np.testing.assert_allclose(got, (b32 + t * (c32 - b32)).astype(np.float32), rtol=0,
                                   atol=1e-6)
    np.testing.assert_array_equal(scaled_state(base, ckpt, 1.0)["w"].numpy(), c32.astype(
        np.float32))
    with pytest.raises(ConfigError, match="not in the base"):
        scaled_state({}, ckpt, 2.0)


def test_scaled_run_is_a_run_folder_eval_loads(make_cfg):
    """The derived folder's checkpoints load through the eval stage's loader; t=1 gives the
    trained checkpoint's logits and t=2 the logits of 2·θ1 - θ0 built here by hand."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from learnforget.analysis.controls import scale_label, scaled_run
    from learnforget.analysis.weights import base_model_folder
    from learnforget.cli import main
    from learnforget.eval.scoring import load_for_eval
    from learnforget.train.loop import fit, setup

    cfg = make_cfg("method=full", "train.precision=fp32", "train.lr=1e-2")
    run = fit(setup(cfg))
    out = scaled_run(run, (1, 2, 0.5))
    info = json.loads((out / "run.json").read_text())
    assert info["run"]["derived_from"] == str(run)
    assert any("theta0 + t" in n for n in info["train"]["notes"])
    labels = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert labels == [scale_label(0.5), scale_label(1), scale_label(2)] == \
        ["x00.50", "x01.00", "x02.00"]
    run_cfg = OmegaConf.load(out / "config.yaml")
    cache = cfg.paths.cache_dir
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    orig = load_for_eval(run_cfg, run / "checkpoints" / "step-000002", cache, "cpu")
    one = load_for_eval(run_cfg, out / "checkpoints" / "x01.00", cache, "cpu")
    two = load_for_eval(run_cfg, out / "checkpoints" / "x02.00", cache, "cpu")
    base = AutoModelForCausalLM.from_pretrained(base_model_folder(run), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(one(ids).logits, orig(ids).logits, rtol=0, atol=1e-5)
        ref = AutoModelForCausalLM.from_pretrained(base_model_folder(run), dtype=torch.float32)
        sd0, sd1 = base.state_dict(), orig.state_dict()
        ref.load_state_dict({k: 2 * sd1[k] - sd0[k] for k in sd1})
        torch.testing.assert_close(two(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(two(ids).logits, orig(ids).logits, atol=1e-3)
    assert json.loads((out / "checkpoints/x02.00/manifest.json").read_text())["scale"] == 2.0
    # the command line: a rerun keeps what exists and adds the new factor; bad input is one line
    assert main(["controls", "scale", str(run), "--t", "4"]) == 0
    assert (out / "checkpoints/x04.00/model.safetensors").exists()
    assert main(["controls", "scale", str(run), "--t", "big"]) == 2
    assert main(["controls", "scale", str(run), "--t", "-1"]) == 2
    assert main(["controls", "scale", str(run), "--sigma", "1"]) == 2


def test_scaled_run_refuses_adapter_runs(make_cfg):
    from learnforget.analysis.controls import scaled_run
    from learnforget.train.loop import fit, setup

    run = fit(setup(make_cfg("method=lora", "method.r=2", "train.precision=fp32")))
    with pytest.raises(ConfigError, match="full-finetuning run"):
        scaled_run(run)


# ------------------------------------------------------------------ power by simulation


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _synthetic_items(n=300, seed=3):
    from learnforget.analysis.power import records

    rng = np.random.default_rng(seed)
    margin = rng.normal(0.2, 1.0, n)
    return records((margin > 0).astype(float), margin)


def _reference(items, n_each=6, seed=4):
    """A checkpoint of the same items: n_each right items and n_each + 3 wrong ones flip
    (churn 2 * n_each / n); every other margin moves by ±0.2 - 0.05 unless that would flip it."""
    rng = np.random.default_rng(seed)
    m = np.asarray([x[0] for x in items["lls"]])
    right, wrong = np.flatnonzero(m > 0), np.flatnonzero(m <= 0)
    moved = m + 0.2 * rng.choice([-1.0, 1.0], size=m.size) - 0.05
    moved = np.where((moved > 0) == (m > 0), moved, m)  # only the chosen items flip
    moved[right[:n_each]] = -np.abs(moved[right[:n_each]]) - 0.01
    moved[wrong[:n_each + 3]] = np.abs(moved[wrong[:n_each + 3]]) + 0.01
    from learnforget.analysis.power import records

    return records((moved > 0).astype(float), moved)


def test_power_at_by_hand():
    """power(δ) = Φ(δ/SE - z) + Φ(-δ/SE - z)."""
    from learnforget.eval.paired import power_at

    z = 1.959963984540054
    assert power_at(0.0, 0.1) == pytest.approx(2 * _normal_cdf(-z), abs=1e-9)  # 0.05
    assert power_at(z * 0.1, 0.1) == pytest.approx(0.5 + _normal_cdf(-2 * z), abs=1e-9)
    assert power_at(-(z + 0.8416212) * 0.1, 0.1) == pytest.approx(0.80, abs=1e-3)


def test_injected_sizes_are_known_flips_at_the_reference_churn():
    """The paired model flips exactly round(N (c/2 + δ)) right items and round(N c/2) wrong
    ones, c the reference's churn (2 * 6 / 300 = 0.04 here), and states the power at the
    realised counts; the margin noise is the reference's own per-item changes, centred."""
    from learnforget.analysis.power import injected_size, population
    from learnforget.eval.paired import flips_se, mde_flips, power_at

    items = _synthetic_items()
    pop = population(items, _reference(items))
    assert pop["churn"] == pytest.approx(0.04)
    assert pop["noise"].mean() == pytest.approx(0.0, abs=1e-12)
    delta, stated, flips = injected_size(pop, "acc", "paired", 0.8)
    want = mde_flips(300, 0.04, 0.8)
    assert flips == {"right_to_wrong": 6 + round(300 * want), "wrong_to_right": 6}
    assert delta == pytest.approx(-round(300 * want) / 300)
    assert stated == pytest.approx(power_at(delta, flips_se(300, 0.04, delta)))
    assert abs(stated - 0.8) < 0.05
    assert injected_size(pop, "acc", "paired", 0.0)[:2] == (0.0, pytest.approx(0.05, abs=1e-6))
    dm, sm, _ = injected_size(pop, "margin", "paired", 0.5)
    assert dm == pytest.approx(-1.959964 * np.std(pop["noise"], ddof=1) / math.sqrt(300),
                               rel=1e-6) and sm == pytest.approx(0.5, abs=1e-4)
    from learnforget.analysis.power import records

    m8 = np.array([0.5, 0.3, -0.2, -0.4, -0.1, -0.6, -0.3, -0.2])  # 2 right of 8
    few = population(records((m8 > 0).astype(float), m8), records((m8 > 0).astype(float), m8))
    assert math.isnan(injected_size(few, "acc", "paired", 0.95)[0])  # more flips than items
    from learnforget.analysis.power import detection_rate

    assert detection_rate(few, "acc", 0.95, n_sims=3)["detected"] is None
    with pytest.raises(ConfigError, match="reference"):
        injected_size(population(items), "acc", "paired", 0.8)
    with pytest.raises(ConfigError, match="model"):
        injected_size(pop, "acc", "psychic", 0.8)
    with pytest.raises(ConfigError, match="power target"):
        injected_size(pop, "acc", "paired", 1.0)


def test_planned_mde_command(capsys):
    """`learnforget controls mde`: n = 500, churn 0.04 at 50% power is 0.02169 by hand
    (test_paired); sd 0.3 at 50% is 1.96 * 0.3 / sqrt(500) = 0.0263; bad input is one line."""
    from learnforget.cli import main

    assert main(["controls", "mde", "--n", "500", "--churn", "0.04", "--sd", "0.3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("paired MDE at 50% power, n=500: accuracy 0.0217 (churn 0.04), "
                      "mean change 0.0263 (sd of differences 0.3)")
    assert out[1].startswith("paired MDE at 80% power, n=500: accuracy 0.0338")
    assert main(["controls", "mde", "--n", "500", "--churn", "2"]) == 2
    assert main(["controls", "mde", "--n", "500"]) == 2


def _detects_at_stated_power(model):
    from learnforget.analysis.power import detection_rate, population

    items = _synthetic_items()
    pop = population(items, _reference(items))
    for measure in ("acc", "margin"):
        null = detection_rate(pop, measure, 0.0, model, n_sims=150, n_boot=400)
        assert null["detected"] <= 0.12, null
        at80 = detection_rate(pop, measure, 0.8, model, n_sims=150, n_boot=400)
        assert abs(at80["detected"] - at80["stated_power"]) < 0.12, at80
        assert at80["realised_delta"] == pytest.approx(at80["delta"], rel=0.2)
    return pop


def test_detection_rate_matches_the_stated_paired_power():
    """Injected forgetting on the items, paired with the reference's churn and margin
    changes: the harness's paired bootstrap detects at the stated rate (150 simulations:
    ±0.07 at 80%, so 0.12 allowed) and at about 5% with no change."""
    from learnforget.analysis.power import detection_rate

    pop = _detects_at_stated_power("paired")
    # the paired MDE is far below the unpaired bound on these items
    paired = detection_rate(pop, "acc", 0.8, "paired", n_sims=2, n_boot=10)
    indep = detection_rate(pop, "acc", 0.8, "independent", n_sims=2, n_boot=10)
    assert abs(paired["delta"]) < 0.5 * abs(indep["delta"])


@pytest.mark.slow
def test_detection_rate_matches_the_unpaired_bound_under_its_assumption():
    """Independent item errors: the unpaired bound states the power the harness detects at."""
    _detects_at_stated_power("independent")


# ------------------------------------------------------------------ learning: facts


def test_facts_are_deterministic_random_and_counted():
    from learnforget.analysis.capacity import bits_learned, fano_bits
    from learnforget.data.facts import fact_pairs, fact_values, facts, facts_bits

    a, b = facts(400, 8), facts(400, 8)
    assert a == b and facts(100, 8) == a[:100]
    assert len({n for n, _ in a}) == 400 and set(v for _, v in a) <= set(fact_values(8))
    counts = np.bincount([fact_values(8).index(v) for _, v in a], minlength=8)
    assert counts.min() > 25  # roughly uniform (expected 50 each)
    assert fact_pairs(2, 8)[0] == (f"{a[0][0]} lives in", f" {a[0][1]}")
    assert facts_bits(1500, 32) == 7500.0
    # bits by hand: 1000 facts, K=4 (2 bits each), recall 0.625 -> chance-adjusted 0.5
    assert bits_learned(0.625, 1000, 4) == pytest.approx(1000.0)
    assert bits_learned(0.1, 1000, 4) == 0.0
    assert fano_bits(1.0, 10, 4) == pytest.approx(20.0)
    p = 0.625  # log2 4 - h2(p) - (1 - p) log2 3
    h = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    assert fano_bits(p, 1000, 4) == pytest.approx(1000 * (2 - h - 0.375 * math.log2(3)))
    with pytest.raises(ConfigError, match="facts_values"):
        fact_values(1)


def test_facts_offset_gives_the_next_facts_of_the_stream_disjoint_from_the_first(make_cfg):
    """data.facts_offset=M: facts M .. M+N-1 of the one generator stream (the capacity control
    pretrains its base on the first M and trains the arms on the next N), through load_records
    too; the values are the same K; a bad offset is a one-line ConfigError."""
    from learnforget.config import run_identity
    from learnforget.data.facts import fact_pairs, fact_values, facts
    from learnforget.data.sources import load_records

    stream = facts(300, 8)
    later = facts(100, 8, offset=200)
    assert later == stream[200:300]
    assert not {n for n, _ in later} & {n for n, _ in stream[:200]}
    assert set(v for _, v in later) <= set(fact_values(8))
    plain = make_cfg("data.max_docs=100", "data.facts_values=8", data="facts")
    cfg = make_cfg("data.max_docs=100", "data.facts_values=8", "data.facts_offset=200",
                   data="facts")
    assert plain.data.facts_offset == 0  # the default: the runs from before the key
    assert [tuple(r) for r in load_records(cfg.data)] == fact_pairs(100, 8, offset=200)
    assert [tuple(r) for r in load_records(plain.data)] == fact_pairs(100, 8)
    # identity: left out at 0 (earlier run names stay), part of it otherwise
    assert "facts_offset" not in run_identity(plain)["data"]
    assert run_identity(cfg)["data"]["facts_offset"] == 200
    assert fact_pairs(1, 8, offset=200)[0] == (f"{later[0][0]} lives in", f" {later[0][1]}")
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="data.facts_offset"):
            facts(10, 8, offset=bad)


def test_value_loglik_matches_a_plain_forward(cache_dir):
    """Each value's summed log-likelihood equals a per-sequence log_softmax by hand."""
    from transformers import AutoModelForCausalLM

    from learnforget.analysis.capacity import value_loglik
    from learnforget.assets.models import base_model_dir, load_tokenizer
    from learnforget.config import compose

    cfg = compose(["model=tiny_llama", f"paths.cache_dir={cache_dir}"])
    folder = base_model_dir(cfg.model, cache_dir)
    tok, model = load_tokenizer(str(folder)), AutoModelForCausalLM.from_pretrained(folder)
    prompts, values = ["Bako Tirel lives in", "Mu lives in"], [" Vusem", " Ra", " Shotikon"]
    got = value_loglik(model, tok, prompts, values, batch_size=4)
    for i, p in enumerate(prompts):
        for j, v in enumerate(values):
            pi = tok(p, add_special_tokens=False)["input_ids"]
            vi = tok(v, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([pi + vi])).logits[0], -1)
            ref = sum(float(lp[len(pi) - 1 + s, t]) for s, t in enumerate(vi))
            assert got[i, j] == pytest.approx(ref, abs=1e-4)


# ------------------------------------------------------------------ toy end to end (slow)


@pytest.mark.slow
def test_toy_forgetting_control_end_to_end(make_cfg, capsys):
    """Tiny full run -> scaled checkpoints -> the eval stage (smoke multiple-choice tasks,
    per-item) -> the forgetting table and the power table from the scored folder."""
    from learnforget.analysis.controls import scaled_run
    from learnforget.analysis.controls_cli import forgetting_rows, power_rows
    from learnforget.cli import main
    from learnforget.eval.stage import evaluate_run
    from learnforget.train.loop import fit, setup

    cfg = make_cfg("method=full", "train.precision=fp32", "train.lr=1e-2", "eval=smoke",
                   "eval.limit=8", "eval.ppl=[]",
                   "eval.diversity.prompts=[]")
    cfg.eval.tasks = [t for t in cfg.eval.tasks if t.kind in ("hellaswag", "winogrande")]
    run = fit(setup(cfg))
    out = scaled_run(run, (1, 8))
    evaluate_run(out, cfg.eval)
    rows = forgetting_rows(out, "smoke")
    assert {(r["t"], r["task"]) for r in rows} == {(t, n) for t in (1.0, 8.0)
                                                    for n in ("lf_smoke_hellaswag",
                                                              "lf_smoke_winogrande")}
    for r in rows:
        assert r["acc_delta_lo"] <= r["acc_delta"] <= r["acc_delta_hi"]
        assert 0 < r["mde50_acc"] < r["mde80_acc"] and r["reference"] == "x01.00"
    big = {r["task"]: r for r in rows if r["t"] == 8.0}
    small = {r["task"]: r for r in rows if r["t"] == 1.0}
    # 8x the update moves the margins further than the update itself
    assert sum(abs(big[k]["margin_delta"]) for k in big) > \
        sum(abs(small[k]["margin_delta"]) for k in small)
    prow = power_rows(out, "smoke", sims=5, reference="x08.00",
                      models=("paired", "independent"))
    assert {r["model"] for r in prow} == {"independent", "paired"}
    assert main(["controls", "forgetting", str(out), "--suite", "smoke"]) == 0
    printed = capsys.readouterr().out
    assert "| lf_smoke_hellaswag | 8 |" in printed and "interval excludes 0" in printed
    assert main(["controls", "power", str(out), "--suite", "smoke", "--reference", "x09"]) == 2


@pytest.mark.slow
def test_toy_learning_control(make_cfg, capsys):
    """data=facts through `learnforget train`: full finetuning of the tiny Llama learns toy
    facts well above chance, held-out facts stay near chance, and the table pairs a LoRA r=1
    run against it over the same facts."""
    from learnforget.analysis.controls_cli import print_recall, recall_rows
    from learnforget.train.loop import fit, setup

    common = ["data.max_docs=36", "data.heldout_docs=4", "data.facts_values=4",
              "train.batch_size=32", "train.seq_len=32", "train.checkpoints.unit=epochs",
              "train.checkpoints.at=[60]", "train.precision=fp32", "method.dropout=0.0"]
    full = fit(setup(make_cfg("method=full", "train.lr=1e-2", *common, data="facts")))
    lora = fit(setup(make_cfg("method=lora", "method.r=1", "train.lr=2e-2", *common,
                              data="facts")))
    rows = recall_rows([full, lora])
    f, lo = rows
    assert f["n_facts"] == 32 and f["info_bits"] == 64.0 and f["chance"] == 0.25
    assert f["recall"] >= 0.75, f  # well above chance 0.25
    assert lo["trainable_params"] < f["trainable_params"] / 50
    assert lo["gap_lo"] <= lo["gap"] <= lo["gap_hi"]
    assert lo["gap"] == pytest.approx(f["recall"] - lo["recall"])
    print_recall(rows)
    assert "bits = N * max(0, (recall - 1/K)" in capsys.readouterr().out
