"""lm-eval tasks on local files: every kind runs offline on a tiny Llama, results match a plain
`lm_eval.simple_evaluate` call, HumanEval scores through our sandbox only when opted in, and the
config hash and bad-input errors behave."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from transformers import LlamaConfig, LlamaForCausalLM

from learnforget.errors import ConfigError
from learnforget.lmeval_tasks import (
    KINDS,
    TaskSpec,
    builtin_yaml,
    clean_metric_key,
    evaluate,
    primary_metric,
    task_config_hash,
    write_task_dir,
)
from learnforget.models import tiny_tokenizer
from learnforget.tasks import humaneval_utils

EVAL = Path(__file__).parent / "fixtures" / "eval"
SEED = 1234
BOOTSTRAP = 100


def n_records(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def all_specs() -> list[TaskSpec]:
    return [
        TaskSpec("lf_hellaswag", "hellaswag", EVAL / "hellaswag.jsonl"),
        TaskSpec("lf_arc", "arc_challenge", EVAL / "arc_challenge.jsonl"),
        TaskSpec("lf_winogrande", "winogrande", EVAL / "winogrande.jsonl"),
        TaskSpec("lf_gsm8k", "gsm8k", EVAL / "gsm8k.jsonl",
                 fewshot_file=EVAL / "gsm8k_train.jsonl", num_fewshot=2, role="target"),
        TaskSpec("lf_humaneval", "humaneval", EVAL / "humaneval.jsonl"),
        TaskSpec("lf_mc", "mc_json", EVAL / "mc_json.jsonl"),
    ]


@pytest.fixture(scope="module")
def hflm():
    from lm_eval.models.huggingface import HFLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512)).eval()
    return HFLM(pretrained=model, tokenizer=tiny_tokenizer(), batch_size=8, max_gen_toks=12)


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
    spec = TaskSpec("lf_he", "humaneval", EVAL / "humaneval.jsonl", max_gen_toks=8)
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
    shutil.copy(EVAL / "hellaswag.jsonl", data)
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
        tiny.write_text("".join((EVAL / "gsm8k.jsonl").read_text().splitlines(True)[:5]))
        write_task_dir([TaskSpec("lf_x", "gsm8k", tiny)], tmp_path / "t")  # built-in: 5 shots
    with pytest.raises(ConfigError, match="used twice"):
        write_task_dir([TaskSpec("a", "mc_json", EVAL / "mc_json.jsonl")] * 2, tmp_path / "t")


def test_metric_names():
    assert {k: primary_metric(k) for k in KINDS} == {
        "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "winogrande": "acc",
        "gsm8k": "exact_match_strict", "humaneval": "pass@1", "mc_json": "acc"}
    assert clean_metric_key("exact_match,flexible-extract") == "exact_match_flexible"
    assert clean_metric_key("acc,none") == "acc"
    assert clean_metric_key("f1,my filter") == "f1_my_filter"
