"""Run names are pinned: the harness can gain keys without renaming a finished run.

fixtures/run_names.json holds the name of every job of every study in sweeps/ (each size) and
of some single commands, as the code before run identity by inclusion composed them (commit
f9aa9bd). The demo's full finetuning and LoRA r=8 runs keep the names of the published demo
results (docs/figures/demo_runs.csv), read here independently of the code; its LoRA r=1 runs
(2026-12-07, in place of r=64) are new names, and its LoRA r=8 runs only seed 0 since then.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from learnforget.config import (
    IDENTITY_DEFAULTS,
    IDENTITY_KEYS,
    NOT_IDENTITY,
    compose,
    config_hash,
    run_identity,
    run_name,
)
from learnforget.studies.plan import expand
from learnforget.studies.study import apply_size, find_study, load_study

ROOT = Path(__file__).parents[1]
GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "run_names.json").read_text())
DEMO = [  # learnforget demo: full and LoRA r=8 as published 2026-12-06 (docs/figures/demo_runs.csv)
    "smollm2_135m-full-stdlib_code-s0-1313be",
    "smollm2_135m-full-stdlib_code-s1-cfcd0e",
    "smollm2_135m-lora_r1_a2_all-stdlib_code-s0-fd471d",   # LoRA r=1: new on 2026-12-07
    "smollm2_135m-lora_r1_a2_all-stdlib_code-s1-4deb9b",
    "smollm2_135m-lora_r8_a16_all-stdlib_code-s0-37b0db",
]
DEMO_DROPPED = ["smollm2_135m-lora_r64_a128_all-stdlib_code-s0-0ef834",  # LoRA r=64, until 2026-12-06
                "smollm2_135m-lora_r64_a128_all-stdlib_code-s1-63d306",
                "smollm2_135m-lora_r8_a16_all-stdlib_code-s1-fae40c"]    # LoRA r=8: seed 0 only since 2026-12-07
# the default tier composes these studies' jobs (the demo: the test above); the rest (about 200
# jobs) are slow
FAST_STUDIES = ("demo_tiny", "code_cpt", "math_cpt", "code_ift", "math_ift",
                "code_cpt@toy", "math_cpt@toy", "code_ift@toy", "math_ift@toy")


def _study_names(key: str) -> list[str]:
    name, _, size = key.partition("@")
    study, extra = apply_size(load_study(find_study(name)), size or None)
    return sorted(job.run_dir.name for job in expand(study, extra).jobs)


def test_the_published_demo_runs_keep_their_names():
    with open(ROOT / "docs" / "figures" / "demo_runs.csv", newline="") as f:
        published = sorted({row["run"] for row in csv.DictReader(f)})
    kept = sorted(set(published) - set(DEMO_DROPPED))
    assert kept and set(kept) <= set(DEMO) and DEMO == GOLDEN["studies"]["demo"]
    assert _study_names("demo") == DEMO


@pytest.mark.parametrize("key", [pytest.param(k, marks=() if k in FAST_STUDIES else pytest.mark.slow)
                                 for k in GOLDEN["studies"]])
def test_every_study_job_keeps_its_name(key):
    assert _study_names(key) == GOLDEN["studies"][key]


@pytest.mark.slow
@pytest.mark.parametrize("command", list(GOLDEN["commands"]))
def test_single_commands_keep_their_names(command):
    assert run_name(compose(command.split())) == GOLDEN["commands"][command]


SOME_COMMANDS = ["", "method=full", "data=arith_ift", "model=smollm2_135m", "debug=fast"]


def test_a_new_defaulted_key_renames_nothing(tmp_path, monkeypatch):
    """A key added to train, data and model configs (as other work adds train.compile) is not
    listed in IDENTITY_KEYS, so no name changes: from the config files or the command line."""
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    for f in ("train/default.yaml", "data/_base.yaml", "model/tiny_llama.yaml",
              "model/smollm2_135m.yaml"):
        with open(conf / f, "a") as out:
            out.write("\nbrand_new_key: false   # a key whose default keeps what runs compute\n")
    monkeypatch.setenv("LEARNFORGET_CONF_DIR", str(conf))
    for command in SOME_COMMANDS:
        cfg = compose(command.split())
        assert cfg.train.brand_new_key is False and cfg.data.brand_new_key is False
        assert run_name(cfg) == GOLDEN["commands"][command], command
    cfg = compose(["train.brand_new_key=true", "+model.revision=main", "+train.compile=true"])
    assert run_name(cfg) == GOLDEN["commands"][""]


def _other(value):
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, list):
        return [*value, value[-1] if value else 1]
    if isinstance(value, dict):
        return {**value, "other": 1}
    return 7  # None


@pytest.fixture(scope="module")
def default_cfg():
    return compose(["data=arith_ift"])  # ift: train.loss_norm counts too


LISTED = [(section, key) for section, keys in IDENTITY_KEYS.items() for key in keys]


@pytest.mark.parametrize(("section", "key"), LISTED)
def test_changing_a_listed_key_changes_the_name(default_cfg, section, key):
    cfg = default_cfg.copy()
    node = cfg[section]
    if key not in node:
        pytest.skip(f"{section}.{key} is not in this model's / data set's config")
    with open_dict(node):
        node[key] = _other(OmegaConf.to_container(node, resolve=True)[key])
    assert config_hash(cfg) != config_hash(default_cfg)
    assert run_name(cfg) != run_name(default_cfg)


@pytest.mark.parametrize(("section", "key", "default"),
                         [(s, k, v) for s, d in IDENTITY_DEFAULTS.items() for k, v in d.items()])
def test_a_listed_key_at_its_old_default_is_left_out(default_cfg, section, key, default):
    """At the value that reproduces the runs from before the key, the name is the one without
    the key; any other value is a new run."""
    with_default, without = default_cfg.copy(), default_cfg.copy()
    with open_dict(with_default[section]), open_dict(without[section]):
        with_default[section][key] = default
        without[section].pop(key, None)
    assert config_hash(with_default) == config_hash(without)
    assert key not in run_identity(with_default)[section]


def test_keys_outside_the_list_are_not_hashed(default_cfg):
    cfg = default_cfg.copy()
    with open_dict(cfg):
        cfg.train.log_every = 50
        cfg.train.distributed.strategy = "fsdp"
        cfg.train.activation_checkpointing = True
        cfg.data.shard_tokens = 123
        cfg.experiment_name = "elsewhere"
        cfg.logger = {"mode": "disabled"}
    assert config_hash(cfg) == config_hash(default_cfg)


def test_every_key_of_the_config_files_is_decided():
    """Each key of conf/model, conf/data and conf/train is hashed (IDENTITY_KEYS) or declared
    not to change what a run computes (NOT_IDENTITY): a new key needs a decision (one line in
    config.py, no name changes either way), so two data sets that differ only in a new
    generator setting cannot share a run folder by oversight."""
    undecided = []
    for section in ("model", "data", "train"):
        assert not set(IDENTITY_KEYS[section]) & set(NOT_IDENTITY[section])
        for f in sorted((ROOT / "conf" / section).glob("*.yaml")):
            for key in yaml.safe_load(f.read_text()) or {}:
                if key != "defaults" and key not in IDENTITY_KEYS[section] + NOT_IDENTITY[section]:
                    undecided.append(f"conf/{section}/{f.name}: {section}.{key}")
    assert not undecided, ("add each to learnforget.config.IDENTITY_KEYS (it changes what a run "
                           "computes) or NOT_IDENTITY (it does not): " + ", ".join(undecided))
