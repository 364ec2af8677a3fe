"""lm-eval tasks on local files: every kind runs offline on a tiny Llama, results match a plain
`lm_eval.simple_evaluate` call, HumanEval scores through our sandbox only when opted in (greedy,
and sampled with the unbiased pass@k), builtin tasks are lm-eval's own and refuse without the
hub, and the config hash and bad-input errors behave."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import lm_eval
import pytest
from conftest import tiny_hflm
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from learnforget.assets.eval_data import SUITE_DATA
from learnforget.errors import ConfigError
from learnforget.eval.lm_eval_run import evaluate
from learnforget.eval.task_specs import (
    BUILTIN,
    KINDS,
    OFFLINE_ENV,
    TaskSpec,
    builtin_yaml,
    chance_level,
    clean_metric_key,
    primary_metric,
    require_hub,
)
from learnforget.eval.task_yaml import task_config_hash, write_task_dir
from learnforget.eval.tasks import humaneval_utils

EVAL = Path(__file__).parent / "fixtures" / "eval"  # test-only task files
SUITE = SUITE_DATA  # the files the smoke suite ships with
SEED = 1234
BOOTSTRAP = 100


def n_records(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def all_specs() -> list[TaskSpec]:
    return [
        TaskSpec("lf_hellaswag", "hellaswag", SUITE / "hellaswag.jsonl"),
        TaskSpec("lf_arc", "arc_challenge", SUITE / "arc_challenge.jsonl"),
        TaskSpec("lf_winogrande", "winogrande", SUITE / "winogrande.jsonl"),
        TaskSpec("lf_gsm8k", "gsm8k", SUITE / "gsm8k.jsonl",
                 fewshot_file=EVAL / "gsm8k_train.jsonl", num_fewshot=2, role="target"),
        TaskSpec("lf_humaneval", "humaneval", SUITE / "humaneval.jsonl"),
        TaskSpec("lf_mc", "mc_json", EVAL / "mc_json.jsonl"),
    ]


@pytest.fixture(scope="module")
def hflm():
    return tiny_hflm(batch_size=8, max_gen_toks=12)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    specs = all_specs()
    return specs, write_task_dir(specs, tmp_path_factory.mktemp("tasks"))


def test_every_kind_runs_offline(hflm, suite):
    specs, include = suite
    res = evaluate(hflm, specs, include, batch_size=8, seed=SEED, code_exec_allowed=True)
    assert set(res) == {s.name for s in specs}
    chance = {"lf_hellaswag": 0.25, "lf_winogrande": 0.5, "lf_gsm8k": None, "lf_humaneval": None}
    for spec in specs:
        r = res[spec.name]
        assert r["n"] == n_records(spec.data_file), spec.name
        assert r["primary_metric"] == primary_metric(spec.kind)
        assert r["primary"] == r["metrics"][r["primary_metric"]]
        for name, value in r["metrics"].items():
            assert 0.0 <= value <= 1.0, (spec.name, name, value)
        assert r["primary_metric"] in r["stderr"]
        assert r["kind"] == spec.kind and r["role"] == spec.role
        assert r["config_hash"] == task_config_hash(include, spec.name)
        assert r["lm_eval_version"] == lm_eval.__version__
        if spec.name in chance:
            assert r["chance"] == chance[spec.name]
    # arc: two items have 3 choices, one 5, the rest 4; mc_json: the mean of 1/len(choices)
    assert res["lf_arc"]["chance"] == pytest.approx((7 / 4 + 2 / 3 + 1 / 5) / 10)
    mc = [json.loads(x) for x in (EVAL / "mc_json.jsonl").read_text().splitlines()]
    assert res["lf_mc"]["chance"] == pytest.approx(sum(1 / len(r["choices"]) for r in mc) / 10)
    assert set(res["lf_gsm8k"]["metrics"]) == {"exact_match_strict", "exact_match_flexible"}
    assert res["lf_gsm8k"]["num_fewshot"] == 2 and res["lf_hellaswag"]["num_fewshot"] == 0
    assert set(res["lf_mc"]["metrics"]) == {"acc", "acc_norm"}
    assert res["lf_humaneval"]["primary"] == 0.0  # a random tiny model writes no working code


def test_matches_plain_simple_evaluate(hflm, suite):
    """Same numbers as lm-eval's own entry point on the same task folder and settings."""
    specs, include = suite
    specs = [s for s in specs if s.kind in ("hellaswag", "gsm8k")]
    names = [s.name for s in specs]
    ours = evaluate(hflm, specs, include, limit=5, batch_size=8, seed=SEED,
                    bootstrap_iters=BOOTSTRAP)
    plain = lm_eval.simple_evaluate(
        model=hflm, tasks=names,
        task_manager=TaskManager(include_path=str(include), include_defaults=False),
        limit=5, random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED,
        fewshot_random_seed=SEED, bootstrap_iters=BOOTSTRAP, log_samples=False)
    for name in names:
        assert ours[name]["n"] == 5
        raw = {k: v for k, v in plain["results"][name].items() if "," in k}  # metric,filter
        expect = {clean_metric_key(k): v for k, v in raw.items() if "_stderr," not in k}
        expect_se = {clean_metric_key(k.replace("_stderr,", ",")): v
                     for k, v in raw.items() if "_stderr," in k}
        assert ours[name]["metrics"] == expect
        assert ours[name]["stderr"] == expect_se
        assert plain["n-shot"][name] == ours[name]["num_fewshot"]


def test_tasks_built_once_give_the_numbers_of_a_fresh_load(hflm, suite):
    """A task_cache (one eval stage) reuses lm-eval's task objects: every call, also after a
    call with other items, gives the per-item results and metrics of a fresh load (fewshot
    examples reseeded, requests rebuilt)."""
    specs, include = suite
    specs = [s for s in specs if s.kind in ("hellaswag", "winogrande", "gsm8k")]
    pick = {s.name: [0, 2, 3] for s in specs}
    run = lambda cache, samples=pick: evaluate(  # noqa: E731
        hflm, specs, include, batch_size=8, seed=SEED, bootstrap_iters=BOOTSTRAP,
        samples=samples, items=True, log_samples=True, task_cache=cache)
    fresh = run(None)
    cache: dict = {}
    first = run(cache)
    (loaded,) = cache.values()
    other = run(cache, {s.name: [1, 4] for s in specs})
    again = run(cache)
    assert list(cache.values()) == [loaded]  # built once
    for name in pick:
        assert other[name]["items"]["doc_id"] == [1, 4]
        for res in (first, again):
            assert res[name]["items"] == fresh[name]["items"], name
            assert res[name]["metrics"] == fresh[name]["metrics"], name
            assert res[name]["stderr"] == fresh[name]["stderr"], name
            assert [x["arguments"] for x in res[name]["samples"]] == \
                [x["arguments"] for x in fresh[name]["samples"]], name


def test_builtin_tasks_override_only_the_data_source(suite):
    """The merged config equals the built-in task's except task name, tag and data keys."""
    specs, include = suite
    data_keys = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs",
                 "training_split", "validation_split", "test_split", "fewshot_split",
                 "num_fewshot"}
    for spec in specs:
        if spec.kind not in ("hellaswag", "arc_challenge", "winogrande", "gsm8k"):
            continue
        ours = load_yaml(include / f"{spec.name}.yaml", resolve_func=False)
        builtin = load_yaml(builtin_yaml(spec.kind), resolve_func=False)
        strip = lambda cfg: {k: v for k, v in cfg.items() if k not in data_keys}  # noqa: E731
        assert strip(ours) == strip(builtin), spec.kind
        assert ours["dataset_path"] == "json" and ours["tag"] == []


class RiggedLM(LM):
    """Answers every HumanEval prompt with the problem's canonical solution."""

    def __init__(self, problems: list[dict]):
        super().__init__()
        self.answers = {p["prompt"]: p["canonical_solution"] for p in problems}

    def generate_until(self, requests, disable_tqdm: bool = False):
        return [self.answers[req.args[0]] for req in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def test_humaneval_scores_through_the_sandbox(tmp_path, monkeypatch):
    spec = TaskSpec("lf_he", "humaneval", SUITE / "humaneval.jsonl", max_gen_toks=8)
    include = write_task_dir([spec], tmp_path / "tasks")
    problems = [json.loads(x) for x in spec.data_file.read_text().splitlines()]
    # the full lm-eval pipeline with a model that knows the answers
    res = evaluate(RiggedLM(problems), [spec], include, code_exec_allowed=True,
                   log_samples=True)
    assert res["lf_he"]["primary"] == 1.0 and res["lf_he"]["n"] == len(problems)
    assert [s["doc"]["task_id"] for s in res["lf_he"]["samples"]] == [p["task_id"] for p in problems]
    # the hook on its own: right and wrong completions
    monkeypatch.setenv(humaneval_utils.ENV_ALLOW, "1")
    for p in problems:
        assert humaneval_utils.process_results(p, [p["canonical_solution"]]) == {"pass@1": 1.0}
        assert humaneval_utils.process_results(p, ["    return None\n"]) == {"pass@1": 0.0}
    # no opt-in: refused, in the hook and before anything runs in evaluate
    monkeypatch.delenv(humaneval_utils.ENV_ALLOW)
    with pytest.raises(ConfigError):
        humaneval_utils.process_results(problems[0], [problems[0]["canonical_solution"]])
    with pytest.raises(ConfigError):
        evaluate(RiggedLM(problems), [spec], include, code_exec_allowed=False)


def test_config_hash_follows_what_defines_the_task(tmp_path):
    data = tmp_path / "hs.jsonl"
    shutil.copy(SUITE / "hellaswag.jsonl", data)
    spec = TaskSpec("lf_hs", "hellaswag", data)
    h0 = task_config_hash(write_task_dir([spec], tmp_path / "a"), "lf_hs")
    assert task_config_hash(write_task_dir([spec], tmp_path / "b"), "lf_hs") == h0  # path-free
    data.write_text(data.read_text().replace("kettle", "teapot"))
    h1 = task_config_hash(tmp_path / "a", "lf_hs")
    assert h1 != h0
    spec.num_fewshot = 1
    assert task_config_hash(write_task_dir([spec], tmp_path / "a"), "lf_hs") not in (h0, h1)


def test_rewriting_a_task_folder_drops_stale_tasks(tmp_path):
    dest = tmp_path / "tasks"
    write_task_dir(all_specs()[:2], dest)
    (dest / "notes.yaml").write_text("not ours\n")
    write_task_dir(all_specs()[1:3], dest)
    assert sorted(p.name for p in dest.glob("*.yaml")) == [
        "lf_arc.yaml", "lf_winogrande.yaml", "notes.yaml"]


def test_bad_specs_are_config_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=rf"'lf_x'.*{missing}"):
        write_task_dir([TaskSpec("lf_x", "hellaswag", missing)], tmp_path / "t")
    with pytest.raises(ConfigError, match="allowed kinds: " + ", ".join(KINDS)):
        write_task_dir([TaskSpec("lf_x", "mmlu", EVAL / "mc_json.jsonl")], tmp_path / "t")
    with pytest.raises(ConfigError, match="allowed kinds"):
        primary_metric("mmlu")
    with pytest.raises(ConfigError, match="lacks field.*answerKey"):
        write_task_dir([TaskSpec("lf_x", "arc_challenge", EVAL / "mc_json.jsonl")], tmp_path / "t")
    with pytest.raises(ConfigError, match="5 few-shot examples need a pool of at least 5"):
        tiny = tmp_path / "gsm.jsonl"
        tiny.write_text("".join((SUITE / "gsm8k.jsonl").read_text().splitlines(True)[:5]))
        write_task_dir([TaskSpec("lf_x", "gsm8k", tiny)], tmp_path / "t")  # built-in: 5 shots
    with pytest.raises(ConfigError, match="used twice"):
        write_task_dir([TaskSpec("a", "mc_json", EVAL / "mc_json.jsonl")] * 2, tmp_path / "t")


def test_metric_names():
    assert {k: primary_metric(k) for k in KINDS} == {
        "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "arc_easy": "acc_norm",
        "winogrande": "acc", "piqa": "acc_norm", "gsm8k": "exact_match_strict",
        "humaneval": "pass@1", "mc_json": "acc"}
    assert clean_metric_key("exact_match,flexible-extract") == "exact_match_flexible"
    assert clean_metric_key("acc,none") == "acc"
    assert clean_metric_key("f1,my filter") == "f1_my_filter"


# ------------------------------------------------------------------ sampled HumanEval (pass@k)


def sampled_spec(**kw) -> TaskSpec:
    args = {"samples": 3, "temperature": 0.2, "top_p": 0.95, "ks": [1, 2, 3]} | kw
    return TaskSpec("lf_he_sampled", "humaneval", SUITE / "humaneval.jsonl", **args)


def formula(n: int, c: int, k: int) -> float:
    """Chen et al. (2021): pass@k = 1 - C(n-c, k) / C(n, k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_aggregation_matches_the_formula():
    counts = [(3, 0), (3, 1), (3, 2), (3, 3), (5, 2)]
    got = humaneval_utils.mean_pass_at_k(counts, [1, 2, 3])
    assert set(got) == {"pass@1", "pass@2", "pass@3"}
    for k in (1, 2, 3):
        assert got[f"pass@{k}"] == pytest.approx(
            sum(formula(n, c, k) for n, c in counts) / len(counts), abs=1e-12)
    assert got["pass@1"] == pytest.approx((0 + 1 / 3 + 2 / 3 + 1 + 2 / 5) / 5)
    assert humaneval_utils.problem_pass_at_k(50, 7, [1, 10]) == pytest.approx(
        {"pass@1": 7 / 50, "pass@10": formula(50, 7, 10)})


def test_sampled_humaneval_task_config(tmp_path):
    """humaneval_64.yaml's sampling setup (repeats, do_sample, temperature, top_p, a filter
    that keeps all n completions, a pass@k metric with k: [...]); greedy stays the default."""
    greedy = TaskSpec("lf_he", "humaneval", SUITE / "humaneval.jsonl")
    include = write_task_dir([greedy, sampled_spec()], tmp_path)
    cfg = load_yaml(include / "lf_he_sampled.yaml", resolve_func=False)
    builtin64 = load_yaml(Path(lm_eval.__file__).parent / "tasks/humaneval/humaneval_64.yaml",
                          resolve_func=False)
    assert cfg["repeats"] == 3 and builtin64["repeats"] == 64
    gen = cfg["generation_kwargs"]
    assert gen["until"] == builtin64["generation_kwargs"]["until"]
    assert (gen["do_sample"], gen["temperature"], gen["top_p"], gen["top_k"]) == (True, 0.2, 0.95, 0)
    assert [f["name"] for f in cfg["filter_list"]] == ["create_test"]
    (metric,) = cfg["metric_list"]
    assert metric["metric"].endswith("humaneval_utils.pass_at_k") and metric["k"] == [1, 2, 3]
    assert "process_results" not in cfg
    plain = load_yaml(include / "lf_he.yaml", resolve_func=False)
    assert plain["repeats"] == 1 and plain["generation_kwargs"]["do_sample"] is False
    assert "filter_list" not in plain  # lm-eval's default: take_first
    hashes = {task_config_hash(include, "lf_he"), task_config_hash(include, "lf_he_sampled"),
              task_config_hash(write_task_dir([sampled_spec(temperature=0.8)], tmp_path / "b"),
                               "lf_he_sampled")}
    assert len(hashes) == 3


class RiggedSamplingLM(RiggedLM):
    """Problem i: its first correct[i] completions are the canonical solution, the rest wrong.
    Records the generation settings it was asked for."""

    def __init__(self, problems: list[dict], correct: dict[str, int]):
        super().__init__(problems)
        self.correct = {p["prompt"]: correct[p["task_id"]] for p in problems}
        self.seen: dict[str, int] = {}
        self.gen_kwargs: list[dict] = []

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            prompt, gen = req.args
            self.gen_kwargs.append(gen)
            i = self.seen.get(prompt, 0)
            self.seen[prompt] = i + 1
            out.append(self.answers[prompt] if i < self.correct[prompt] else "    return None\n")
        return out


def test_sampled_humaneval_reports_the_unbiased_pass_at_k(tmp_path):
    spec = sampled_spec()
    include = write_task_dir([spec], tmp_path)
    problems = [json.loads(x) for x in spec.data_file.read_text().splitlines()]
    correct = {p["task_id"]: i % 4 for i, p in enumerate(problems)}  # 0..3 of 3 pass
    lm = RiggedSamplingLM(problems, correct)
    res = evaluate(lm, [spec], include, code_exec_allowed=True, log_samples=True)["lf_he_sampled"]
    assert sorted(lm.seen.values()) == [3] * len(problems)  # n = 3 requests per problem
    assert all(g["do_sample"] is True and g["temperature"] == 0.2 and g["top_p"] == 0.95
               for g in lm.gen_kwargs)
    assert res["n"] == len(problems) and res["primary_metric"] == "pass@1"
    counts = [(3, correct[p["task_id"]]) for p in problems]
    assert set(res["metrics"]) == {"pass@1", "pass@2", "pass@3"}
    for k in (1, 2, 3):
        expect = sum(formula(n, c, k) for n, c in counts) / len(counts)
        assert res["metrics"][f"pass@{k}"] == pytest.approx(expect, abs=1e-12)
        assert res["stderr"][f"pass@{k}"] is not None
    assert res["primary"] == res["metrics"]["pass@1"]
    assert [len(s["filtered_resps"][0]) for s in res["samples"]] == [3] * len(problems)
    with pytest.raises(ConfigError, match="allow_code_execution"):
        evaluate(lm, [spec], include, code_exec_allowed=False)


def test_sampled_humaneval_on_a_tiny_model(hflm, tmp_path):
    spec = sampled_spec(ks=[1, 2])
    include = write_task_dir([spec], tmp_path)
    res = evaluate(hflm, [spec], include, seed=SEED, code_exec_allowed=True,
                   log_samples=True)["lf_he_sampled"]
    assert res["n"] == n_records(spec.data_file)
    assert set(res["metrics"]) == {"pass@1", "pass@2"}
    assert all(0.0 <= v <= 1.0 for v in res["metrics"].values())
    assert res["primary"] == res["metrics"]["pass@1"] and res["chance"] is None
    assert all(len(s["resps"][0]) == 3 for s in res["samples"])  # n completions per problem


def test_bad_sampling_settings_are_config_errors(tmp_path):
    def bad(match: str, **kw):
        with pytest.raises(ConfigError, match=match):
            write_task_dir([sampled_spec(**kw)], tmp_path)

    bad("needs a temperature > 0", temperature=None)
    bad("needs a temperature > 0", temperature=0.0)
    bad("top_p must be in", top_p=1.5)
    bad(r"pass@5 needs at least 5 samples per problem, but samples is 3", ks=[1, 5])
    bad("ks must be a non-empty list", ks=[])
    bad("samples must be an integer >= 1", samples=0)
    bad("apply to sampled HumanEval only", samples=None)
    with pytest.raises(ConfigError, match="samples is for kind humaneval"):
        write_task_dir([TaskSpec("lf_g", "gsm8k", SUITE / "gsm8k.jsonl", num_fewshot=2,
                                 samples=3, temperature=0.2)], tmp_path)


# ------------------------------------------------------------------ builtin: lm-eval's own tasks

BUILTIN_NAMES = ("hellaswag", "arc_challenge", "winogrande", "gsm8k")


def builtin_specs() -> list[TaskSpec]:
    return [TaskSpec("hellaswag", BUILTIN), TaskSpec("arc_challenge", BUILTIN),
            TaskSpec("winogrande", BUILTIN),
            TaskSpec("gsm8k", BUILTIN, num_fewshot=5, role="target")]


def test_builtin_tasks_are_lm_evals_own(tmp_path):
    """Our task folder resolves each builtin name to the YAML lm-eval's own index does (of
    the built-in task folders: the whole default index would take ~10 s more), and to the same
    merged config but for `tag`; no network: nothing is loaded."""
    include = write_task_dir(builtin_specs(), tmp_path)
    ours = TaskManager(include_path=str(include), include_defaults=False)
    folders = sorted({str(builtin_yaml(name).parent) for name in BUILTIN_NAMES})
    theirs = TaskManager(include_path=folders, include_defaults=False)
    assert set(BUILTIN_NAMES) <= set(ours.all_tasks) and set(BUILTIN_NAMES) <= set(theirs.all_tasks)
    for name in BUILTIN_NAMES:
        assert theirs.task_index[name].yaml_path.resolve() == builtin_yaml(name)
        a, b = dict(ours.task_index[name].cfg), dict(theirs.task_index[name].cfg)
        assert a.pop("tag") == [] and a["task"] == name
        b.pop("tag", None)
        assert a == b, name  # gsm8k's num_fewshot 5 is the built-in default too
        assert not (a.get("dataset_kwargs") or {}).get("data_files")  # data from the hub


def test_builtin_specs_results_shape_and_hash(tmp_path, monkeypatch):
    specs = builtin_specs()
    include = write_task_dir(specs, tmp_path / "a")
    assert {s.name: primary_metric(BUILTIN, s.name) for s in specs} == {
        "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "winogrande": "acc",
        "gsm8k": "exact_match_strict"}
    assert [chance_level(s) for s in specs] == [0.25, None, 0.5, None]
    # the hash: our YAML + the built-in YAML text (and its functions), path-free
    h = {s.name: task_config_hash(include, s.name) for s in specs}
    assert h == {s.name: task_config_hash(write_task_dir(specs, tmp_path / "b"), s.name)
                 for s in specs}
    specs[3].num_fewshot = 3
    assert task_config_hash(write_task_dir(specs, tmp_path / "a"), "gsm8k") != h["gsm8k"]
    # no hub: refused before any model work (lm=None would fail at once otherwise)
    for var in OFFLINE_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    msg = ("task hellaswag needs the Hugging Face hub to download its data, which cannot be "
           "reached here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set): use eval=offline")
    with pytest.raises(ConfigError, match=re.escape(msg)):
        evaluate(None, specs, include)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    with pytest.raises(ConfigError, match=re.escape("eval=paper " + msg)):
        require_hub("hellaswag", suite="paper")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    require_hub("hellaswag", suite="paper")  # reachable as far as the settings go


def test_bad_builtin_specs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="'mmlu' is not one of hellaswag, arc_challenge"):
        write_task_dir([TaskSpec("mmlu", BUILTIN)], tmp_path)
    with pytest.raises(ConfigError, match="give no data or few-shot file"):
        write_task_dir([TaskSpec("hellaswag", BUILTIN, SUITE / "hellaswag.jsonl")], tmp_path)
    with pytest.raises(ConfigError, match="max_gen_toks"):
        write_task_dir([TaskSpec("hellaswag", BUILTIN, max_gen_toks=8)], tmp_path)
    with pytest.raises(ConfigError, match="no data file given"):
        write_task_dir([TaskSpec("lf_hs", "hellaswag")], tmp_path)
    gen = load_yaml(write_task_dir([TaskSpec("gsm8k", BUILTIN, max_gen_toks=64)], tmp_path)
                    / "gsm8k.yaml", resolve_func=False)["generation_kwargs"]
    assert gen["max_gen_toks"] == 64 and gen["until"] == load_yaml(
        builtin_yaml("gsm8k"), resolve_func=False)["generation_kwargs"]["until"]


def test_stale_generated_task_files_are_removed_and_others_kept(tmp_path):
    """write_task_dir removes the task YAMLs it generated earlier (also those whose first line
    names the module before the split, learnforget.eval.lmeval_tasks) and keeps a user's file."""
    old = tmp_path / "gone.yaml"
    old.write_text("# Written by learnforget.eval.lmeval_tasks.write_task_dir: regenerated on "
                   "every write.\ntask: gone\n")
    mine = tmp_path / "mine.yaml"
    mine.write_text("task: mine  # Written by learnforget.eval. (not on the first line)\n")
    write_task_dir([TaskSpec("lf_arc", "arc_challenge", SUITE_DATA / "arc_challenge.jsonl")],
                   tmp_path)
    assert not old.exists() and mine.exists()
    assert (tmp_path / "lf_arc.yaml").read_text().startswith(
        "# Written by learnforget.eval.task_yaml.write_task_dir")
