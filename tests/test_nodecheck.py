"""`learnforget node-check` on the CPU: the items it can run pass, the GPU items are skipped
with their reason, a FAIL makes the exit status 1. The full command (2 gloo processes: the
all-reduce sum and one FSDP step against an unsharded process) is the slow test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learnforget import nodecheck
from learnforget.cli import main as cli_main
from learnforget.nodecheck import FAIL, OK, SKIPPED, Item

SRC = Path(nodecheck.__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the CPU verdicts")


@no_gpu
def test_fast_items_on_cpu():
    v = nodecheck.check_versions()
    assert v.verdict == OK and "torch " in v.detail and "peft " in v.detail
    assert "lm_eval 0.4" in v.detail and "NCCL none" in v.detail
    b = nodecheck.check_bf16()
    assert b.verdict == OK and "CPU, bf16 instructions" in b.detail
    m = nodecheck.check_memory(0)
    assert m.verdict == SKIPPED and "no CUDA GPU" in m.detail
    assert m.line().startswith("memory      skipped: no CUDA GPU")
    lm = nodecheck.check_lm_eval(0)
    assert lm.verdict == OK, lm.detail
    diff = float(lm.detail.split("log-probabilities ")[1].split()[0])
    assert diff < 1e-4  # fp32 on the CPU (measured 1.1e-6)


def test_a_fail_is_exit_status_one_and_a_crash_is_a_fail(monkeypatch, capsys, tmp_path):
    class NoRanks:
        def __init__(self, gpus):
            raise OSError("cannot spawn")

    monkeypatch.setattr(nodecheck, "check_versions", lambda: Item("versions", OK, "x"))
    monkeypatch.setattr(nodecheck, "check_bf16", lambda: Item("bf16", FAIL, "wrong sums"))
    monkeypatch.setattr(nodecheck, "Collectives", NoRanks)
    monkeypatch.setattr(nodecheck, "check_lm_eval", lambda gpus: 1 / 0)
    out = tmp_path / "node.json"
    assert cli_main(["node-check", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "bf16        FAIL  wrong sums" in text
    assert "all-reduce  FAIL  OSError: cannot spawn" in text
    assert "lm-eval     FAIL  ZeroDivisionError" in text
    assert text.strip().splitlines()[-1].startswith("FAIL: bf16, all-reduce, lm-eval")
    items = {i["name"]: i["verdict"] for i in json.loads(out.read_text())["items"]}
    assert items["versions"] == OK and items["bf16"] == FAIL
    assert cli_main(["node-check", "--bogus"]) == 2


@no_gpu
@pytest.mark.slow
def test_node_check_command_on_cpu(tmp_path):
    """The whole command in a fresh process (measured: 71 s wall, 24 s CPU on a loaded 2-core
    VM; the gloo all-reduce is exact and the FSDP step equals one process's to 0.0)."""
    out = tmp_path / "node.json"
    r = subprocess.run([sys.executable, "-m", "learnforget.cli", "node-check", "--json",
                        str(out)], env={**os.environ, "PYTHONPATH": str(SRC)},
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    items = {i["name"]: i for i in json.loads(out.read_text())["items"]}
    assert list(items) == ["versions", "bf16", "all-reduce", "fsdp", "memory", "lm-eval"]
    assert {k: v["verdict"] for k, v in items.items()} == {
        "versions": OK, "bf16": OK, "all-reduce": OK, "fsdp": OK, "memory": SKIPPED,
        "lm-eval": OK}
    assert "gloo, 2 CPU processes: sum 3 (expected 3)" in items["all-reduce"]["detail"]
    rel = float(items["fsdp"]["detail"].split("one unsharded process ")[1].split()[0])
    assert rel <= 1e-4
    assert r.stdout.strip().splitlines()[-1].startswith("all ok")
