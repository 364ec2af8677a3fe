"""Bad input: a one-line error naming the value and what was expected; nothing is damaged."""

from __future__ import annotations

import hashlib

import pytest
from conftest import FAST

from learnforget.assets.eval_data import SUITE_DATA
from learnforget.cli import main


def _tree(root) -> dict[str, str]:
    """Every file under root with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "_hydra" not in p.parts}


def _main(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """One finished run that every bad-input case must leave byte for byte as it is (trained
    once per module: a case that wrote or changed anything fails on its own tree check)."""
    runs = tmp_path_factory.mktemp("bad_input") / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEARNFORGET_RUNS_DIR", str(runs))
        mp.setenv("LEARNFORGET_CACHE_DIR", str(cache_dir))
        code = _main("train", *FAST, "data.max_docs=8", "data.heldout_docs=2")
    assert code in (0, None)
    return runs, _tree(runs)


@pytest.fixture
def runs_dir(trained):
    return trained[0]


@pytest.fixture
def finished_run(trained):
    return trained[1]


@pytest.fixture
def cli(runs_dir, cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("LEARNFORGET_RUNS_DIR", str(runs_dir))
    monkeypatch.setenv("LEARNFORGET_CACHE_DIR", str(cache_dir))

    def run(*args: str) -> tuple[int, str]:
        code = _main(*args)
        return code, capsys.readouterr().err

    return run


BAD = {
    "unknown method": (["method=foo"], "unknown method 'foo' (expected one of: adapter, bitfit, did, dora, full"),
    "unknown model": (["model=gpt5"], "unknown model 'gpt5' (expected one of:"),
    "unknown data": (["data=nope"], "unknown data 'nope' (expected one of:"),
    "rank zero": (["method.r=0"], "method.r must be a positive integer, got 0"),
    "rank negative": (["method.r=-4"], "method.r must be a positive integer, got -4"),
    "unknown key": (["train.lrr=1"], "unknown config key 'train.lrr'"),
    "unknown target set": (["method.targets=everything"],
                           "method.targets 'everything' is not a named set (expected one of "
                           "attention, mlp, all"),
    "absent target module": (["method.targets=[q_proj,foo_proj]"],
                             "method.targets: 'foo_proj' matches no linear layer of "
                             "model=tiny_llama (expected names among:"),
    "missing data file": (["data=local_text", "data.path=/nonexistent/corpus.jsonl"],
                          "data.path: no such file or folder: '/nonexistent/corpus.jsonl'"),
    "data path unset": (["data=local_text"], "data.path is required for data=local_text"),
    "qlora on conv1d": (["model=tiny_gpt2", "method=qlora"],
                        "method=qlora: model=tiny_gpt2 (gpt2) uses Conv1D layers"),
    "qlora odd widths": (["method=qlora", "model.arch.hidden_size=48",
                          "model.arch.num_attention_heads=4"],
                         "method=qlora: model=tiny_llama cannot be quantised to 4 bit: layer "
                         "widths must be multiples of 32"),
    "bitfit without biases": (["method=bitfit", "model.arch.attention_bias=false",
                               "model.arch.mlp_bias=false"],
                              "method=bitfit: model=tiny_llama has no bias parameters"),
    "unknown peft type": (["method=vera", "method.peft.type=VERAX"],
                          "method.peft.type 'VERAX' is not a peft type (expected one of: "),
    "bad peft argument": (["method=loha", "+method.peft.rnak=4"],
                          "method=loha: peft's LOHA config rejects method.peft"),
    "peft section not a mapping": (["method=vera", "method.peft=VERA"],
                                   "method.peft must be a mapping such as {type: VERA, r: 256}"),
    "data method target absent": (["method=vera", "method.targets=[q_proj,foo_proj]"],
                                  "method.targets: 'foo_proj' matches no linear layer of "),
    "unknown optimizer": (["train.optimizer=sgdx"], "train.optimizer 'sgdx' is unknown"),
    "budgets not increasing": (["train.checkpoints.at=[4,2]"],
                               "train.checkpoints.at must be strictly increasing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line_and_damages_nothing(cli, runs_dir, finished_run, case):
    overrides, expected = BAD[case]
    code, err = cli("train", *FAST, "data.max_docs=8", "data.heldout_docs=2", *overrides)
    assert code == 2
    lines = [x for x in err.strip().splitlines() if x.startswith("learnforget: error:")]
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert _tree(runs_dir) == finished_run  # nothing written, nothing changed


def test_unknown_command(cli):
    code, err = cli("trian")
    assert code == 2 and "unknown command 'trian' (expected one of: train" in err


def test_fixture_paths_exist():
    assert (SUITE_DATA / "tiny_corpus.jsonl").exists()
