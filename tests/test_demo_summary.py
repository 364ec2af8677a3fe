"""The demo's printed summary (learnforget.studies.demo): the regime column of its table and the
three answers taken from the analysis's regime.md, on hand-made inputs (the end-to-end path is
test_demo_study.py)."""

from __future__ import annotations

import json

import pandas as pd

from learnforget.studies.demo import regime_answers, results_table


def test_the_demo_table_states_tokens_per_trainable_parameter():
    base = {"checkpoint": "base", "method_summary": "full", "tokens": 0, "seed": 0,
            "ce/target_heldout": 2.47, "trainable_params": 134515008}
    rows = [base]
    for summary, trainable in (("full", 134515008), ("lora_r1_a2_all", 305280)):
        for seed in (0, 1):
            rows.append({"checkpoint": "token-000008192", "method_summary": summary,
                         "tokens": 8192, "seed": seed, "ce/target_heldout": 2.40 + seed / 100,
                         "trainable_params": trainable})
    table, out = results_table(pd.DataFrame(rows))
    # by hand: 8,192 / 134,515,008 = 6.09e-05; 8,192 / 305,280 = 0.02683
    assert [r["tokens/param"] for r in out] == ["-", "6.1e-05", "0.027"]
    assert table.splitlines()[0].startswith("| method | tokens | seeds | tokens/param | code CE |")
    assert "| lora_r1_a2_all | 8192 | 2 | 0.027 | 2.4050 ± 0.0050 |" in table
    # without the parameter count (results from before it was recorded) the column is left out
    _, old = results_table(pd.DataFrame(rows).drop(columns="trainable_params"))
    assert all(r["tokens/param"] == "-" for r in old)


def test_the_answers_are_the_regime_files_sections_per_lora_setting(tmp_path):
    assert regime_answers(tmp_path) == ""  # no regime analysis (no per-unit results)
    section = ("| question | measure |\n|---|---|\n| 1. does LoRA learn less? | code |")
    (tmp_path / "regime.md").write_text(
        "# The regime study: demo\n\nRegime = ...\n\n| method | seed |\n|---|---|\n| full | 0 |"
        f"\n\n## full vs lora_r1_a2_all\n\n{section}\n\n## full vs lora_r8_a16_all\n\n{section}"
        "\n\nEvery budget's answer: regime_answers.csv.\n")
    got = regime_answers(tmp_path)
    assert got == (f"## full vs lora_r1_a2_all\n\n{section}\n\n"
                   f"## full vs lora_r8_a16_all\n\n{section}")


def test_a_study_that_scores_one_checkpoint_is_complete_once_that_one_is_scored(tmp_path):
    """eval.checkpoint (the demo scores its last budget only): the eval stage is complete when
    the summary has that checkpoint's row; without it, every checkpoint's row is needed."""
    from learnforget.runfolder import MANIFEST, RunFolder
    from learnforget.studies.job import eval_complete

    folder = RunFolder(tmp_path)
    for step, label in ((4, "token-000004096"), (8, "token-000008192")):
        (tmp_path / "checkpoints" / label).mkdir(parents=True)
        (tmp_path / "checkpoints" / label / MANIFEST).write_text(json.dumps({"step": step}))
    summary = folder.eval_summary("demo")
    summary.parent.mkdir(parents=True)
    rows = [{"checkpoint": "base"}, {"checkpoint": "token-000008192"}]
    summary.write_text(json.dumps({"suite": "demo", "rows": rows}))
    assert eval_complete(tmp_path, "demo", "token-000008192")
    assert not eval_complete(tmp_path, "demo")  # every checkpoint: 4,096 is missing
    assert not eval_complete(tmp_path, "demo", "token-000004096")
    assert not eval_complete(tmp_path, "demo", "token-000016384")  # not a checkpoint of the run
