"""Training from token shards: the process's peak RSS does not grow with the corpus, a run
killed mid-run resumes to the same weights as an uninterrupted one, and two gloo ranks read
disjoint blocks that together are one process's double batch.

RSS is the training process's max resident set size (run.json train.peak_mem_mb, from
getrusage). Bound: a 10x larger corpus may add at most RSS_BOUND_MIB; the in-memory path on
the same large corpus is measured too, to show that the bound would catch a corpus held in
memory."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, TORCHRUN, free_port
from crash_hook import crash_after
from safetensors.torch import load_file
from test_shards import WORDS, make_docs, prep, tok  # noqa: F401 - tok is a fixture

from learnforget.data.shards import ShardCorpus
from learnforget.runfolder import RunFolder, RunRecord

RSS_BOUND_MIB = 8.0
COMMON = [*FAST, "data=local_text", "data.format=shards", "data.heldout_docs=2",
          "train.num_threads=1", "method=full", "train.seq_len=32", "train.precision=fp32"]


def _write_corpus(folder: Path, n_docs: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(n_docs):
        text = " ".join(rng.choice(WORDS) for _ in range(400))
        (folder / f"doc{i:05d}.txt").write_text(text)
    return folder


def _train(runs: Path, cache: Path, *overrides: str,
           crash_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LEARNFORGET_RUNS_DIR": str(runs), "LEARNFORGET_CACHE_DIR": str(cache),
           "OMP_NUM_THREADS": "1"}
    env, hook = crash_after(crash_at, env)  # die (os._exit) after that step
    return subprocess.run([sys.executable, "-m", "learnforget.cli", "train", *COMMON, *overrides,
                           *hook],
                          env=env, capture_output=True, text=True, timeout=300)


def _run_info(runs: Path, experiment: str) -> RunRecord:
    return RunFolder(next((runs / experiment).iterdir())).read_record()


@pytest.mark.slow
def test_peak_rss_stays_flat_when_the_corpus_grows_tenfold(tmp_path, cache_dir):
    small = _write_corpus(tmp_path / "small", 300)
    big = _write_corpus(tmp_path / "big", 3000)
    runs = tmp_path / "runs"
    peaks, tokens = {}, {}
    for name, folder, fmt in (("small", small, "shards"), ("big", big, "shards"),
                              ("big_memory", big, "memory")):
        p = _train(runs, cache_dir, f"data.path={folder}", f"data.format={fmt}",
                   "data.shard_tokens=100000", "train.checkpoints.at=[2,4]",
                   f"experiment_name={name}")
        assert p.returncode == 0, p.stderr[-2000:]
        info = _run_info(runs, name)
        peaks[name] = info.train.peak_mem_mb
        tokens[name] = info.train.data.get("corpus_tokens")
    assert tokens["big"] >= 9 * tokens["small"]  # the corpus did grow ~10x
    grown = peaks["big"] - peaks["small"]
    print(f"peak RSS MiB: {peaks}; corpus tokens: {tokens}")
    assert grown <= RSS_BOUND_MIB, peaks
    assert peaks["big_memory"] - peaks["big"] > 5 * RSS_BOUND_MIB, peaks  # the bound has teeth


def _weights(run: Path, label: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / label / "model.safetensors")


def test_run_killed_mid_corpus_resumes_to_the_same_weights(tmp_path, cache_dir):
    folder = _write_corpus(tmp_path / "corpus", 40)
    runs = tmp_path / "runs"
    common = [f"data.path={folder}", "data.shard_tokens=3000", "train.checkpoints.at=[2,4]"]
    ref = _train(runs, cache_dir, *common, "experiment_name=straight")
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _train(runs, cache_dir, *common, "experiment_name=killed", crash_at=2)
    assert killed.returncode == 137, killed.stderr[-2000:]
    resumed = _train(runs, cache_dir, *common, "experiment_name=killed")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-2000:]
    a = next((runs / "straight").iterdir())
    b = next((runs / "killed").iterdir())
    info = RunFolder(b).read_record()
    assert info.status == "finished" and "resumed from step 2" in info.train.notes
    data = info.train.data
    assert data["format"] == "shards" and data["n_shards"] >= 3  # reads cross several shards
    wa, wb = _weights(a, "step-000004"), _weights(b, "step-000004")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)
    assert info.train.data_position == 4 * 2  # sequences read: 4 steps x batch 2
    acc = data["accounting"]
    assert acc["sequences"] == 4 * 2 and acc["unique_tokens"] == 8 * 32
    assert acc["repeated_tokens"] == 0


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_two_gloo_ranks_read_disjoint_blocks_that_make_the_double_batch(tmp_path, tok):  # noqa: F811
    prep(tok, make_docs(80, seed=4), tmp_path / "shards")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    probe = Path(__file__).parent / "fixtures" / "shard_rank_probe.py"
    out = tmp_path / "ranks.json"
    p = subprocess.run([str(TORCHRUN), "--nproc_per_node=2", f"--master_port={free_port()}", str(probe),
                        str(tmp_path / "shards"), str(out), "2"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = json.loads(out.read_text())
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    corpus = ShardCorpus(tmp_path / "shards")
    from learnforget.data.shards import sequence_blocks

    n = corpus.n_tokens // 32
    for index, (b0, b1) in enumerate(zip(r0["batches"], r1["batches"], strict=True)):
        assert not set(b0["blocks"]) & set(b1["blocks"])  # disjoint positions
        one = sequence_blocks(index, 4, 0, 1, n, seed=5)  # one process, twice the batch
        assert b0["blocks"] + b1["blocks"] == one
        want = np.stack([corpus.tokens(i * 32, 32) for i in one])  # read straight from the files
        np.testing.assert_array_equal(np.array(b0["rows"] + b1["rows"]), want)
    every = [i for b in r0["batches"] + r1["batches"] for i in b["blocks"]]
    assert len(set(every)) == len(every) == 16  # 4 micro-batches x 4: no block twice
