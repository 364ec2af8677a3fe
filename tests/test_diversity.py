"""Generation diversity (paper fig. 5): unique completions among a sampled HumanEval task's
samples, split by pass and fail: the counting on hand examples, the stored generations, each
distinct program run once, the per-checkpoint eval result, and the analysis table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from lm_eval.api.model import LM
from omegaconf import OmegaConf, open_dict

from learnforget.analysis.diversity import collect_diversity, diversity_table, write_diversity
from learnforget.assets.eval_data import SUITE_DATA
from learnforget.errors import ConfigError
from learnforget.eval import sandbox
from learnforget.eval.diversity import generation_record, problem_counts, recount, samples_of
from learnforget.eval.lm_eval_run import evaluate
from learnforget.eval.task_specs import TaskSpec
from learnforget.eval.task_yaml import write_task_dir
from learnforget.eval.tasks import humaneval_utils

PROBLEMS = [json.loads(x) for x in (SUITE_DATA / "humaneval.jsonl").read_text().splitlines()]
WRONG = "    return None\n"


def test_counts_on_a_hand_example():
    # 6 samples: "a" twice (pass), "a  \n" (pass: the same code with trailing whitespace),
    # "b" and "b\n" (fail), "  b" (fail: other indentation is another string in both modes)
    completions = ["a", "a", "a  \n", "b", "b\n", "  b"]
    passed = [True, True, True, False, False, False]
    assert problem_counts(completions, passed, "exact") == {
        "n": 6, "n_pass": 3, "unique": 5, "unique_pass": 2, "unique_fail": 3}
    assert problem_counts(completions, passed, "stripped") == {
        "n": 6, "n_pass": 3, "unique": 3, "unique_pass": 1, "unique_fail": 2}
    # trailing spaces inside lines go too; blank lines inside and leading spaces stay
    assert problem_counts(["x = 1 \t\ny = 2", "x = 1\ny = 2\n\n", "x = 1\n\ny = 2"],
                          [False] * 3, "stripped")["unique"] == 2
    assert problem_counts([], [], "exact") == {"n": 0, "n_pass": 0, "unique": 0,
                                               "unique_pass": 0, "unique_fail": 0}
    with pytest.raises(ConfigError, match="'loose' is unknown"):
        problem_counts(["a"], [True], "loose")


def test_generation_record_keeps_every_sample_in_order():
    completions = ["b", "a", "b", "c", "a"]
    rec = generation_record(7, "HumanEval/7", completions, {"a": True, "b": False, "c": False})
    assert rec == {"doc_id": 7, "task_id": "HumanEval/7", "texts": ["b", "a", "c"],
                   "passed": [False, True, False], "order": [0, 1, 0, 2, 1]}
    assert samples_of(rec) == (completions, [False, True, False, False, True])
    got = recount([rec, generation_record(9, "HumanEval/9", ["z"] * 5, {"z": False})], "exact")
    assert [(p["unique"], p["unique_pass"], p["unique_fail"]) for p in got["problems"]] == \
        [(3, 1, 2), (1, 0, 1)]
    assert (got["mean_unique"], got["mean_unique_pass"], got["mean_unique_fail"]) == \
        (2.0, 0.5, 1.5)
    assert got["problems_with_pass"] == 1 and got["samples"] == 5 and got["n_problems"] == 2


class ScriptedLM(LM):
    """Answers problem i's k-th request with scripts[task_id][k]."""

    def __init__(self, scripts: dict[str, list[str]]):
        super().__init__()
        self.scripts = scripts
        self.by_prompt = {p["prompt"]: p["task_id"] for p in PROBLEMS}
        self.seen: dict[str, int] = {}

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            tid = self.by_prompt[req.args[0]]
            k = self.seen.get(tid, 0)
            self.seen[tid] = k + 1
            out.append(self.scripts[tid][k])
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def test_sampled_task_stores_generations_and_runs_each_program_once(tmp_path, monkeypatch):
    good = [p["canonical_solution"] for p in PROBLEMS]
    scripts = {PROBLEMS[0]["task_id"]: [good[0], good[0], good[0] + "\n", WRONG, WRONG],
               PROBLEMS[1]["task_id"]: [WRONG] * 5,
               **{p["task_id"]: [good[i], WRONG, WRONG + "\n", "    return 0\n", good[i]]
                  for i, p in enumerate(PROBLEMS) if i >= 2}}
    spec = TaskSpec("lf_he_div", "humaneval", SUITE_DATA / "humaneval.jsonl", samples=5,
                    temperature=0.2, top_p=0.95, diversity="exact")
    include = write_task_dir([spec], tmp_path)
    calls: list[str] = []
    real = sandbox.run_in_sandbox
    monkeypatch.setattr(sandbox, "run_in_sandbox",
                        lambda src, **kw: calls.append(src) or real(src, **kw))
    res = evaluate(ScriptedLM(scripts), [spec], include, code_exec_allowed=True)["lf_he_div"]
    # every distinct program ran once, for pass@k and the split together
    distinct = {(p["task_id"], c) for p in PROBLEMS for c in scripts[p["task_id"]]}
    assert len(calls) == len(set(calls)) == len(distinct)
    assert "samples" not in res  # the per-sample log is not kept beyond the generations
    gens = {g["task_id"]: g for g in res["generations"]}
    for p in PROBLEMS:
        assert samples_of(gens[p["task_id"]])[0] == scripts[p["task_id"]]
    by_id = {q["task_id"]: q for q in res["diversity"]["problems"]}
    # by hand: problem 0: 3 distinct (2 passing: the solution with and without a newline)
    assert {k: by_id[PROBLEMS[0]["task_id"]][k] for k in ("n_pass", "unique", "unique_pass",
                                                           "unique_fail")} == \
        {"n_pass": 3, "unique": 3, "unique_pass": 2, "unique_fail": 1}
    assert by_id[PROBLEMS[1]["task_id"]]["unique"] == 1
    assert by_id[PROBLEMS[1]["task_id"]]["unique_fail"] == 1
    for p in PROBLEMS[2:]:
        assert {k: by_id[p["task_id"]][k] for k in ("n_pass", "unique", "unique_pass",
                                                     "unique_fail")} == \
            {"n_pass": 2, "unique": 4, "unique_pass": 1, "unique_fail": 3}
    n = len(PROBLEMS)
    assert res["diversity"]["mean_unique"] == pytest.approx((3 + 1 + 4 * (n - 2)) / n)
    assert res["diversity"]["mean_unique_pass"] == pytest.approx((2 + 0 + (n - 2)) / n)
    # pass@1 from the same samples agrees with the split
    assert res["primary"] == pytest.approx((3 / 5 + 0 + 2 / 5 * (n - 2)) / n)
    # stripped: the solution with a trailing newline is the same completion
    again = recount(res["generations"], "stripped")["problems"][0]
    assert (again["unique"], again["unique_pass"]) == (2, 1)


def test_program_results_runs_a_program_once(monkeypatch):
    monkeypatch.setenv(humaneval_utils.ENV_ALLOW, "1")
    p = PROBLEMS[0]
    test = f"{p['test']}\ncheck({p['entry_point']})"
    good, bad = p["prompt"] + p["canonical_solution"], p["prompt"] + WRONG
    calls: list[str] = []
    real = sandbox.run_in_sandbox
    monkeypatch.setattr(sandbox, "run_in_sandbox",
                        lambda src, **kw: calls.append(src) or real(src, **kw))
    assert humaneval_utils.program_results([good, bad, good, bad + "\0"], test) == \
        [True, False, True, False]
    assert len(calls) == 2  # the NUL program is failed without running
    with humaneval_utils.remembered_results():
        assert humaneval_utils.count_passed([good, bad], test) == 1
        assert humaneval_utils.program_results([bad, good], test) == [False, True]
    assert len(calls) == 4  # the second call inside the block ran nothing
    humaneval_utils.program_results([good], test)
    assert len(calls) == 5  # nothing is kept outside the block


def test_bad_diversity_settings_are_config_errors(tmp_path):
    def bad(match: str, **kw):
        with pytest.raises(ConfigError, match=match):
            write_task_dir([TaskSpec("lf_x", "humaneval", SUITE_DATA / "humaneval.jsonl", **kw)],
                           tmp_path)

    bad(r"diversity='loose' is unknown \(expected one of: exact, stripped\)", samples=3,
        temperature=0.2, diversity="loose")
    bad("needs a sampled humaneval task", diversity="exact")


def test_table_means_intervals_and_paired_change():
    rows = []
    base = {1: (5, 0, 5), 2: (3, 1, 2), 3: (8, 0, 8)}
    full = {  # two seeds: the setting's value per problem is their mean
        0: {1: (2, 0, 2), 2: (1, 1, 0), 3: (4, 0, 4)},
        1: {1: (4, 0, 4), 2: (1, 1, 0), 3: (2, 0, 2)}}
    common = {"suite": "s", "task": "t", "mode": "exact", "samples": 10, "n_pass": 0}
    for doc, (u, up, uf) in base.items():
        rows.append({**common, "run": "base", "setting": "base", "checkpoint": "base",
                     "tokens": 0, "doc_id": doc, "unique": u, "unique_pass": up,
                     "unique_fail": uf})
    for seed, probs in full.items():
        for doc, (u, up, uf) in probs.items():
            rows.append({**common, "run": f"full-s{seed}", "setting": "full",
                         "checkpoint": "c", "tokens": 100, "doc_id": doc, "unique": u,
                         "unique_pass": up, "unique_fail": uf, "n_pass": 1 if up else 0})
    t = diversity_table(pd.DataFrame(rows))
    assert list(t["setting"]) == ["base", "full"]
    b, f = t.iloc[0], t.iloc[1]
    assert (b["runs"], b["problems"], f["runs"], f["problems"]) == (1, 3, 2, 3)
    assert b["unique"] == pytest.approx(16 / 3) and np.isnan(b["d_unique"])
    assert f["unique"] == pytest.approx((3 + 1 + 3) / 3)
    assert f["unique_pass"] == pytest.approx(1 / 3)
    assert f["d_unique"] == pytest.approx(((3 - 5) + (1 - 3) + (3 - 8)) / 3)
    assert f["d_unique_pass"] == pytest.approx((0 + 0 + 0) / 3)
    assert f["pass@1"] == pytest.approx((0 + 0.1 + 0) / 3)
    assert f["d_unique_lo"] <= f["d_unique"] <= f["d_unique_hi"]
    assert f["d_unique_hi"] < 0  # every problem lost distinct completions
    # the interval is a percentile bootstrap over problems: within the per-problem range
    assert f["unique_lo"] >= 1 and f["unique_hi"] <= 3


@pytest.mark.slow  # ~29 s of CPU (a tiny run trained and scored, base included)
def test_per_checkpoint_result_and_analysis(make_cfg, tmp_path, capsys):
    from learnforget.eval.stage import evaluate_run
    from learnforget.train.loop import fit, setup

    cfg = make_cfg("method=lora", "method.r=4", "train.lr=5e-3", "eval=smoke",
                   "eval.diversity.prompts=[]", "eval.ppl=[]", "eval.max_gen_toks=8",
                   "eval.checkpoint=step-000002")
    with open_dict(cfg):
        cfg.eval.tasks = OmegaConf.create([{
            "name": "lf_he_div", "kind": "humaneval", "data": "package:humaneval.jsonl",
            "samples": 3, "temperature": 1.0, "top_p": 1.0, "role": "target",
            "diversity": "exact"}])
    run = fit(setup(cfg))
    summary = json.loads(evaluate_run(run, cfg.eval).read_text())
    last = summary["rows"][-1]
    result = json.loads((run / "eval" / f"{last['checkpoint']}.json").read_text())
    task = result["tasks"]["lf_he_div"]
    assert len(task["generations"]) == len(PROBLEMS)
    per = task["diversity"]["problems"]
    for g, p in zip(task["generations"], per, strict=True):
        completions, passed = samples_of(g)
        assert len(completions) == 3
        assert p["unique"] == len(set(completions))  # exact strings
        assert p["n_pass"] == sum(passed)
    assert last["diversity/lf_he_div/unique"] == pytest.approx(
        np.mean([p["unique"] for p in per]))
    assert "delta/diversity/lf_he_div/unique" in last
    printed = capsys.readouterr().out
    assert "lf_he_div: unique completions per problem (all / passing / failing)" in printed
    assert f"{last['diversity/lf_he_div/unique']:.2f} / " in printed
    # the analysis reads the same counts, the base's from its cached result
    df = collect_diversity(run.parents[1])
    assert sorted(df["checkpoint"].unique()) == sorted(r["checkpoint"] for r in summary["rows"])
    table = diversity_table(df)
    row = table[(table["setting"] != "base") & (table["tokens"] == last["tokens"])].iloc[0]
    assert row["unique"] == pytest.approx(np.mean([p["unique"] for p in per]))
    base_json = json.loads(next((run.parents[1] / "_base").rglob("smoke*.json")).read_text())
    base_per = base_json["tasks"]["lf_he_div"]["diversity"]["problems"]
    assert row["d_unique"] == pytest.approx(
        np.mean([p["unique"] - q["unique"] for p, q in zip(per, base_per, strict=True)]))
    paths = write_diversity(run.parents[1], tmp_path / "out")
    assert {p.name for p in paths} >= {"diversity.csv", "diversity.md", "diversity.png"}
    assert "| base | 0 |" in (tmp_path / "out" / "diversity.md").read_text()
