"""The laptop study in the paper's regime (sweeps/regime_cpt.yaml; learnforget.analysis.regime):
the statistics of its three answers against hand calculations, the per-block cross-entropy
against plain torch, the regime in the dry run and run.json, and the toy size end to end,
including a hard kill and a rerun that end identical to an uninterrupted study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from crash_hook import crash_after

from learnforget.analysis.regime import matched_answer, paired_answer, write_regime


def _unit(values, ids=("set", 0)):
    v = np.asarray(values, float)
    return v, np.ones_like(v), ids


# ------------------------------------------------------------------ statistics


def test_paired_answer_is_the_mean_unit_difference_with_a_bootstrap_interval():
    rng = np.random.default_rng(3)
    n = 400
    full = [_unit(rng.normal(2.0, 0.3, n)), _unit(rng.normal(2.0, 0.3, n))]
    shift = 0.05
    lora = [_unit(f[0] + shift + rng.normal(0, 0.1, n)) for f in full]
    got = paired_answer(full, lora, 1.0, n_boot=4000)
    diff = np.mean([lo[0] - f[0] for f, lo in zip(full, lora, strict=True)], axis=0)
    assert got["value"] == pytest.approx(diff.mean(), abs=1e-12)
    half = 1.959964 * diff.std(ddof=1) / np.sqrt(n)  # normal approximation, by hand
    assert got["ci_low"] == pytest.approx(diff.mean() - half, abs=0.25 * half)
    assert got["ci_high"] == pytest.approx(diff.mean() + half, abs=0.25 * half)
    assert got["ci_low"] > 0  # a 0.05 shift over 400 units with sd ~0.07 is resolved
    assert got["per_seed"] == pytest.approx([(lo[0] - f[0]).mean() for f, lo in zip(full, lora, strict=True)])
    flipped = paired_answer(full, lora, -1.0, n_boot=4000)
    assert flipped["value"] == pytest.approx(-got["value"])
    assert flipped["ci_high"] == pytest.approx(-got["ci_low"])


def test_paired_answer_weights_blocks_by_their_tokens():
    a = (np.array([1.0, 3.0]), np.array([1.0, 3.0]), ("x", 2))
    b = (np.array([2.0, 3.5]), np.array([1.0, 3.0]), ("x", 2))
    got = paired_answer([a], [b], 1.0, n_boot=50)
    assert got["value"] == pytest.approx((1.0 * 1 + 0.5 * 3) / 4)


def test_units_scored_differently_are_one_config_error():
    from learnforget.errors import ConfigError

    with pytest.raises(ConfigError, match="different paired units"):
        paired_answer([_unit([1, 2], ("a", 2))], [_unit([1, 2], ("b", 2))], 1.0)


def _run(summary, seed, xs, ys):
    """A run whose code CE per budget is xs[1:] (xs[0]: the base) and forgetting ys, each
    measure constant over 5 units (so every resample gives the same trajectory)."""
    def units(x, y):
        return {"code_ce": _unit([x] * 5), "general_ce": _unit([y] * 5)}
    return {"summary": summary, "seed": seed, "base": units(xs[0], ys[0]),
            "units": {1000 * (i + 1): units(x, y) for i, (x, y) in enumerate(zip(xs[1:], ys[1:], strict=True))}}


def test_matched_answer_reads_forgetting_at_the_same_learning_by_hand():
    # full: CE 3.0 -> 2.0 while forgetting rises 0 -> 1.0 (slope -1); LoRA: 3.0 -> 2.5, 0 -> 0.25
    # (slope -0.5). Overlap of CE: [2.5, 3.0]; 8 levels 2.9375 .. 2.5 (from the base's end);
    # at CE c: full 3 - c, LoRA (3 - c) / 2; difference (3 - c) / 2, mean over the levels.
    full = _run("full", 0, [3.0, 2.5, 2.0], [0.0, 0.5, 1.0])
    lora = _run("lora", 0, [3.0, 2.75, 2.5], [0.0, 0.125, 0.25])
    levels = 3.0 - 0.5 * np.arange(1, 9) / 8
    want = np.mean((3.0 - levels) / 2)
    got = matched_answer([(full, lora)], "general_ce", 1.0, n_boot=50)
    assert got["value"] == pytest.approx(want)
    assert got["ci_low"] == pytest.approx(want) and got["ci_high"] == pytest.approx(want)
    assert got["pairs"] == 1


def test_a_regularised_full_arm_is_answered_against_plain_full_by_hand():
    # sweeps/regularisers.yaml: every arm of one method at seed 0. Plain full: CE 3.0 -> 2.0,
    # forgetting 0 -> 1.0; wd arm: CE 3.0 -> 2.2 (learns 0.2 nats less), forgetting 0 -> 0.6
    # (forgets 0.4 less); the questions name the arm.
    from learnforget.analysis.regime import answers

    runs = [_run("full", 0, [3.0, 2.0], [0.0, 1.0]),
            _run("full + wd 0.0001", 0, [3.0, 2.2], [0.0, 0.6]),
            _run("lora_r2_a4_all", 0, [3.0, 2.9], [0.0, 0.1])]
    got = answers(runs, "full", "full + wd 0.0001", n_boot=50).set_index("question")
    assert got.loc["1. does full + wd 0.0001 learn less?", "value"] == pytest.approx(0.2)
    assert got.loc["2. does full + wd 0.0001 forget less?", "value"] == pytest.approx(0.4)
    lora = answers(runs, "full", "lora_r2_a4_all", n_boot=50).set_index("question")
    assert lora.loc["1. does LoRA learn less?", "value"] == pytest.approx(0.9)


def test_two_runs_of_one_arm_and_seed_are_one_config_error_naming_both():
    # Before arms were told apart, the five full arms of the regularisers study were all
    # "full" at seed 0 and the answers silently paired whichever came last.
    from learnforget.analysis.regime import answers
    from learnforget.errors import ConfigError

    a = {**_run("full", 0, [3.0, 2.0], [0.0, 1.0]), "run": "full-s0-aaa"}
    b = {**_run("full", 0, [3.0, 2.2], [0.0, 0.6]), "run": "full-s0-bbb"}
    lora = {**_run("lora_r2_a4_all", 0, [3.0, 2.9], [0.0, 0.1]), "run": "lora-s0"}
    with pytest.raises(ConfigError, match="'full-s0-aaa' and 'full-s0-bbb' are both 'full' at seed 0"):
        answers([a, b, lora], "full", "lora_r2_a4_all", n_boot=10)


def test_seed_spread_is_the_later_seed_minus_the_first_per_measure_by_hand():
    from learnforget.analysis.regime import seed_spread

    runs = [_run("full", 0, [3.0, 2.0], [0.0, 1.0]), _run("full", 1, [3.0, 2.1], [0.0, 0.75]),
            _run("lora_r2_a4_all", 0, [3.0, 2.9], [0.0, 0.1])]  # one seed: no row
    got = seed_spread(runs, n_boot=20).set_index("measure")
    assert set(got["arm"]) == {"full"} and set(got["seeds"]) == {"1 - 0"}
    assert got.loc["code_ce", "value"] == pytest.approx(0.1)
    assert got.loc["general_ce", "value"] == pytest.approx(-0.25)
    assert got.loc["general_ce", "units"] == 5


# ------------------------------------------------------------------ per-block cross-entropy


def test_block_cross_entropy_matches_plain_torch(make_cfg, cache_dir):
    import torch.nn.functional as F

    from learnforget.assets.models import load_model
    from learnforget.data.packing import Example
    from learnforget.eval.crossentropy import block_cross_entropy, mean_cross_entropy

    cfg = make_cfg()
    model = load_model(cfg.model, cfg.method, cache_dir)[0]
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (12, 20, 7):
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        examples.append(Example(input_ids=ids, labels=ids))
    examples.append(Example(input_ids=examples[0].input_ids, labels=[-100] * 12))  # no label
    ces, counts = block_cross_entropy(model, examples, pad_id=0)
    assert ces[-1] == 0.0 and counts[-1] == 0  # weighs nothing
    ces, counts, examples = ces[:-1], counts[:-1], examples[:-1]
    want = []
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0].float()
            want.append(float(F.cross_entropy(logits[:-1], torch.tensor(ex.labels[1:]))))
    assert counts == [11, 19, 6]
    assert ces == pytest.approx(want, rel=1e-5)
    mean, n = mean_cross_entropy(model, examples, batch_size=8, pad_id=0)
    assert n == sum(counts)
    assert mean == pytest.approx(np.dot(ces, counts) / n, rel=1e-5)


# ------------------------------------------------------------------ the study file


def test_the_dry_run_states_the_regime_and_the_deviations(capsys):
    from learnforget.studies.command import sweep_main

    assert sweep_main("regime_cpt", dry_run=True) == 0
    out = capsys.readouterr().out
    assert sum("note: Deviation" in line for line in out.splitlines()) >= 5
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "3 "))
            and ("full" in line or "lora_r1" in line) and "float32" in line]
    tpp = {r[1]: float(r[-2]) for r in rows}  # the column before the measured peak ("-")
    assert tpp["lora_r1_a2_all"] == pytest.approx(307200 / 305280, abs=1e-3)  # >= 1
    assert tpp["full"] == pytest.approx(307200 / 134515008, rel=1e-3)
    assert "tokens/param" in out and "~500 at LoRA r=16" in out


def test_the_regime_note_is_budget_tokens_per_trainable_parameter(make_cfg):
    from learnforget.data.budget import regime_note

    cfg = make_cfg("train.checkpoints.unit=tokens", "train.checkpoints.at=[1000,3000]")
    note = regime_note(cfg, 1200)
    assert note.startswith("regime: 3,000 tokens to the last budget / 1,200 trainable")
    assert "= 2.5 tokens per trainable parameter" in note and "~500 at LoRA r=16" in note
    epochs = make_cfg("train.checkpoints.unit=epochs", "train.checkpoints.at=[1]")
    assert regime_note(epochs, 1200) is None  # the tokens of an epoch are known once trained
    assert "= 0.5 tokens per trainable parameter" in regime_note(epochs, 1200, tokens=600)


def _sweep(runs: Path, cache: Path, crash_at: int | None = None) -> subprocess.CompletedProcess:
    """The toy study; with `crash_at`, its first training process dies after that step
    (tests/crash_hook.py: os._exit(137), as a SIGKILL), which ends the basic launcher too."""
    env, crash = crash_after(crash_at, {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
                                        "WANDB_MODE": "disabled"})
    return subprocess.run([sys.executable, "-m", "learnforget.cli", "sweep", "regime_cpt",
                           "--size", "toy", "--no-analyze", f"paths.runs_dir={runs}",
                           f"paths.cache_dir={cache}", *crash], env=env, capture_output=True,
                          text=True, timeout=900)


def _scores(path: Path) -> dict:
    """What an eval result measured (no timings, paths or versions)."""
    r = json.loads(path.read_text())
    return {"tasks": {k: t["items"] for k, t in r["tasks"].items()},
            "ppl": {k: (p["blocks"], p["ce"]) for k, p in r["ppl"].items()},
            "drift": r["drift"]["variants"]["all"]["per_prompt_kl"]}


@pytest.mark.slow
def test_the_toy_study_killed_and_rerun_ends_identical_to_an_uninterrupted_one(tmp_path,
                                                                               cache_dir):
    """--size toy twice: straight through, and hard-killed (os._exit(137)) at step 14 of its
    first run (the plateau past the 3rd budget's branch point) then rerun. Every run's
    checkpoints, every per-unit score and the three answers agree exactly."""
    from safetensors.torch import load_file

    straight = _sweep(tmp_path / "a", cache_dir)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    killed = _sweep(tmp_path / "b", cache_dir, crash_at=14)
    assert killed.returncode == 137, killed.stdout[-3000:] + killed.stderr[-3000:]
    again = _sweep(tmp_path / "b", cache_dir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "4/4 job(s) done" in again.stdout

    ra, rb = tmp_path / "a/regime_cpt_toy", tmp_path / "b/regime_cpt_toy"
    runs = sorted(p.name for p in ra.iterdir() if p.name.startswith("tiny_llama-"))
    assert len(runs) == 4 and runs == sorted(p.name for p in rb.iterdir()
                                             if p.name.startswith("tiny_llama-"))
    n_ckpt = 0
    for run in runs:
        for ck in sorted((ra / run / "checkpoints").iterdir()):
            for f in ck.glob("*.safetensors"):
                wa, wb = load_file(f), load_file(rb / run / "checkpoints" / ck.name / f.name)
                assert wa.keys() == wb.keys()
                for k in wa:
                    torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)
            assert _scores(ra / run / "eval" / f"{ck.name}.json") == \
                _scores(rb / run / "eval" / f"{ck.name}.json")
            n_ckpt += 1
    assert n_ckpt == 16  # 4 runs x 4 budgets
    for run in runs:  # run.json states the regime: the last budget (1,280) per trainable param
        rec = json.loads((rb / run / "run.json").read_text())["train"]
        want = f"= {1280 / rec['trainable_params']:.4g} tokens per trainable parameter"
        assert sum(want in n for n in rec["notes"]) == 1, rec["notes"]
    pa, pb = write_regime(ra, tmp_path / "out_a"), write_regime(rb, tmp_path / "out_b")
    assert [p.name for p in pa] == [p.name for p in pb]
    for name in ("regime_answers.csv", "regime_runs.csv"):
        assert (tmp_path / "out_a" / name).read_text() == (tmp_path / "out_b" / name).read_text()
    text = (tmp_path / "out_a" / "regime.md").read_text()
    for q in ("1. does LoRA learn less?", "2. does LoRA forget less?",
              "3. which forgets less at matched learning?"):
        assert q in text
    for stem in ("regime_vs_tokens", "regime_pareto"):
        assert (tmp_path / "out_a" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    # the study's cost, from the run folders: the killed run counts the same steps, and its
    # training CPU goes on over the resume (no "not counted" note)
    from learnforget.analysis.regime import cost_table, load_runs

    assert "## Cost" in text
    ca, cb = cost_table(load_runs(ra)), cost_table(load_runs(rb))
    assert list(ca["train_steps"]) == list(cb["train_steps"]) and ca["method"].iloc[-1] == "all"
    for c in (ca, cb):
        assert c[["train_wall_h", "train_cpu_h", "eval_wall_h", "eval_cpu_h"]].iloc[-1].gt(0).all()
        assert (c["note"].iloc[:-1] == "").all(), list(c["note"])
