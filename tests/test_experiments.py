"""One way to define an experiment: every file of conf/experiment/ composes, the hand-run
experiments land in the very run folders of the study jobs they stand for, and every command
that docs/experiments.md and conf/config.yaml show composes. conf/ holds only Hydra groups
(cluster profiles live in clusters/)."""

from __future__ import annotations

import itertools
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from learnforget.config import compose, run_name, validate
from learnforget.errors import ConfigError
from learnforget.studies.cluster import cluster_profile_path, load_cluster_profile
from learnforget.studies.study import find_study, is_sweep, load_study, sweep_values

ROOT = Path(__file__).parents[1]
GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "run_names.json").read_text())
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_file_composes(name):
    text = (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    cfg = compose([f"experiment={name}"])
    validate(cfg)
    if not name.startswith("_"):
        assert cfg.experiment_name in name  # runs/<experiment_name>/, the study's folder


@pytest.mark.parametrize(("experiment", "study", "job"), [
    ("demo_lora", "demo", "smollm2_135m-lora_r8_a16_all-stdlib_code-s0-37b0db"),
    ("demo_full", "demo", "smollm2_135m-full-stdlib_code-s0-1313be"),
    ("code_cpt_lora", "code_cpt", "llama2_7b-lora_r16_a32_all-starcoder_python-s0-b7836e"),
    ("code_cpt_full", "code_cpt", "llama2_7b-full-starcoder_python-s0-94c7a0"),
])
def test_a_hand_run_experiment_is_its_study_job(experiment, study, job):
    """The names were pinned before experiments existed (fixtures/run_names.json)."""
    assert job in GOLDEN["studies"][study]
    cfg = compose([f"experiment={experiment}"])
    assert (cfg.experiment_name, run_name(cfg)) == (study, job)


def test_command_line_overrides_win_over_the_experiment():
    cfg = compose(["experiment=demo_lora", "model=tiny_llama", "train.lr=1e-3", "debug=fast"])
    assert cfg.model.name == "tiny_llama" and cfg.train.lr == 1e-3
    assert cfg.train.batch_size == 2 and list(cfg.train.checkpoints.at) == [1, 2]  # debug=fast


def test_an_unknown_experiment_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError) as e:
        compose(["experiment=code_cpt_loar"])
    msg = str(e.value)
    assert msg.startswith("unknown experiment 'code_cpt_loar' (expected one of: ")
    assert "code_cpt_lora" in msg and "_paper" not in msg and "\n" not in msg


def _documented(text: str) -> list[list[str]]:
    """`learnforget <cmd> ...` lines of a page (code blocks or `#` comments), as argv lists."""
    out = []
    for line in text.splitlines():
        m = re.search(r"(?:^|#\s*)learnforget (train|params|job|sweep) (.*)$", line.strip())
        if m:
            out.append([m.group(1), *shlex.split(m.group(2).split(" # ")[0])])
    return out


DOCUMENTED = (_documented((ROOT / "docs" / "experiments.md").read_text())
              + _documented((ROOT / "conf" / "config.yaml").read_text()))


@pytest.mark.parametrize("argv", DOCUMENTED, ids=[" ".join(a) for a in DOCUMENTED])
def test_every_documented_command_composes(argv):
    cmd, args = argv[0], [a for a in argv[1:] if not a.startswith("-") and a != "job"]
    if cmd == "sweep":  # the study and its size exist (the golden name tests compose the jobs)
        study = load_study(find_study(args[0]))
        if "--size" in argv:
            assert argv[argv.index("--size") + 1] in study.sizes
        return
    axes = [sweep_values(*a.split("=", 1), where="docs") if is_sweep(a) else [a.split("=", 1)[1]]
            for a in args]
    keys = [a.split("=", 1)[0] for a in args]
    for values in itertools.product(*axes):
        validate(compose([f"{k}={v}" for k, v in zip(keys, values, strict=True)]))


def test_conf_holds_only_hydra_groups_and_clusters_live_outside():
    defaults = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())["defaults"]
    groups = {next(iter(d)) for d in defaults if isinstance(d, dict)} | {"hydra"}
    assert {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()} <= groups
    assert not (ROOT / "conf" / "cluster").exists()
    for name in ("default", "llama7b_full_fsdp"):
        path = cluster_profile_path(name)
        assert path == ROOT / "clusters" / f"{name}.yaml"
        assert load_cluster_profile(path)  # the launcher's fields, checked
