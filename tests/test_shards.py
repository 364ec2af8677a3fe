"""Token shards (learnforget.data.shards): preparation (content, checksums, held-out split, resume
after a kill), reading by position, the seeded block order, and what ranks read.

References are independent of the code under test: the tokenizer called directly and numpy
concatenation for shard content, hashlib over the files for checksums, sorted numpy ranges
for the permutation."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from learnforget.data.shards import (
    ShardBlocks,
    ShardCorpus,
    accounting,
    permute,
    prepare_shards,
    sequence_blocks,
)
from learnforget.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILE = REPO / "src" / "learnforget" / "assets" / "tiny_tokenizer.json"
WORDS = ("def", "return", "class", "import", "self", "value", "index", "yield", "lambda",
         "print", "range", "while", "for", "if", "else", "None", "True", "data", "shard")


@pytest.fixture(scope="module")
def tok():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token=None, model_max_length=512)


def make_docs(n: int, seed: int = 0, words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words)))
            for _ in range(n)]


def reference_stream(tok, docs: list[str]) -> np.ndarray:
    """Every document's ids followed by EOS, concatenated (the tokenizer called directly)."""
    parts = [np.array(tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
             for d in docs]
    return np.concatenate(parts).astype(np.int64)


def prep(tok, docs, folder: Path, **kw) -> dict:
    args = {"shard_tokens": 500, "heldout_docs": 3, "source": "test docs",
            "tokenizer_name": "tiny", "batch_chars": 2000, **kw}
    return prepare_shards(iter(docs), tok, folder, **args)


def test_shards_hold_the_token_stream_with_checksums_and_heldout_apart(tok, tmp_path):
    docs = make_docs(60)
    m = prep(tok, docs, tmp_path)
    assert m["complete"] and m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == len(tok)
    assert len(m["shards"]) >= 3
    # held-out: the first 3 documents, in their own file, never in the training shards
    held = np.fromfile(tmp_path / "heldout.bin", dtype=np.uint16).astype(np.int64)
    np.testing.assert_array_equal(held, reference_stream(tok, docs[:3]))
    train = np.concatenate([np.fromfile(tmp_path / e["file"], dtype=np.uint16)
                            for e in m["shards"]]).astype(np.int64)
    np.testing.assert_array_equal(train, reference_stream(tok, docs[3:]))
    assert m["n_train_tokens"] == len(train) and m["n_train_docs"] == 57
    for e in m["shards"]:
        data = (tmp_path / e["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"]
        assert len(data) == 2 * e["tokens"]
    # every shard but the last reached shard_tokens, and none took a document more than needed
    assert all(e["tokens"] >= 500 for e in m["shards"][:-1])
    assert json.loads((tmp_path / "manifest.json").read_text()) == m


class Killed(Exception):
    pass


def killed_after(docs, n):
    for i, d in enumerate(docs):
        if i == n:
            raise Killed
        yield d


class CountingTokenizer:
    """The tokenizer, counting the documents it is asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.docs = tok, 0

    def __call__(self, texts, **kw):
        self.docs += len(texts)
        return self.tok(texts, **kw)

    def __len__(self):
        return len(self.tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_preparation_killed_mid_shard_resumes_to_the_same_shards(tok, tmp_path):
    docs = make_docs(60, seed=1)
    straight = prep(tok, docs, tmp_path / "a")
    with pytest.raises(Killed):
        prepare_shards(killed_after(docs, 40), tok, tmp_path / "b", shard_tokens=500,
                       heldout_docs=3, source="test docs", tokenizer_name="tiny", batch_chars=2000)
    partial = json.loads((tmp_path / "b/manifest.json").read_text())
    assert not partial["complete"] and 1 <= len(partial["shards"]) < len(straight["shards"])
    kept = {e["file"]: (tmp_path / "b" / e["file"]).stat().st_mtime_ns for e in partial["shards"]}
    done_docs = 3 + sum(e["docs"] for e in partial["shards"])
    counting = CountingTokenizer(tok)
    resumed = prep(counting, docs, tmp_path / "b")
    assert resumed["shards"] == straight["shards"] and resumed["heldout"] == straight["heldout"]
    assert resumed["checksum"] == straight["checksum"]
    assert counting.docs == 60 - done_docs  # the finished shards' documents are not tokenized again
    for f, mtime in kept.items():  # finished shards kept as they were
        assert (tmp_path / "b" / f).stat().st_mtime_ns == mtime
    assert not list((tmp_path / "b").glob(".*.tmp"))


def test_reader_reads_any_position_across_shard_boundaries(tok, tmp_path):
    docs = make_docs(40, seed=2)
    m = prep(tok, docs, tmp_path)
    ref = reference_stream(tok, docs[3:])
    corpus = ShardCorpus(tmp_path)
    first_boundary = m["shards"][0]["tokens"]
    for start, length in [(0, 64), (first_boundary - 10, 64), (len(ref) - 64, 64), (123, 1)]:
        np.testing.assert_array_equal(corpus.tokens(start, length), ref[start:start + length])
    blocks = ShardBlocks(corpus, 64)
    assert len(blocks) == len(ref) // 64
    assert blocks[5].input_ids == ref[320:384].tolist() == blocks[5].labels
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_incomplete_shards_are_refused(tok, tmp_path):
    with pytest.raises(Killed):
        prepare_shards(killed_after(make_docs(30), 20), tok, tmp_path, shard_tokens=500,
                       heldout_docs=3, source="x", tokenizer_name="tiny", batch_chars=2000)
    with pytest.raises(ConfigError, match="no complete token shards"):
        ShardCorpus(tmp_path)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permute_is_a_bijection(n):
    for key in (0, 12345):
        got = np.array([permute(i, n, key) for i in range(n)])
        np.testing.assert_array_equal(np.sort(got), np.arange(n))


def test_permute_depends_on_the_key_and_shuffles():
    n = 1000
    a = [permute(i, n, 1) for i in range(n)]
    b = [permute(i, n, 2) for i in range(n)]
    assert a != b
    # not the identity nor a shift: few fixed points, and neighbours land far apart
    assert sum(x == i for i, x in enumerate(a)) < 10
    assert np.median(np.abs(np.diff(a))) > 50


def test_a_budget_up_to_the_corpus_is_unique_blocks_then_repeats():
    n, batch = 50, 4
    seen = [b for i in range(13) for b in sequence_blocks(i, batch, 0, 1, n, seed=3)]
    assert len(seen) == 52
    assert sorted(seen[:50]) == list(range(50))  # epoch 0: every block once
    assert sequence_blocks(0, batch, 0, 1, n, seed=3) != sequence_blocks(0, batch, 0, 1, n, seed=4)
    acc = accounting(n, 52, 64)
    assert (acc["unique_tokens"], acc["repeated_tokens"]) == (50 * 64, 2 * 64)
    assert acc["budget_exceeds_corpus"]


def test_two_ranks_read_disjoint_blocks_that_make_the_double_batch():
    n, b = 997, 3
    for index in range(5):
        r0 = sequence_blocks(index, b, 0, 2, n, seed=7)
        r1 = sequence_blocks(index, b, 1, 2, n, seed=7)
        one = sequence_blocks(index, 2 * b, 0, 1, n, seed=7)
        assert not set(r0) & set(r1)
        assert r0 + r1 == one


def _budget_rows(out: str) -> list[list[str]]:
    lines = out.split("data per job:")[1].splitlines()[2:]
    return [ln.split(None, 8) for ln in lines if ln.strip()]


def test_code_cpt_dry_run_shows_each_jobs_budget_against_the_corpus(tmp_path, capsys, tok):
    from learnforget.data.shards import ensure_corpus
    from learnforget.studies.plan import expand
    from learnforget.studies.report import print_data_budget
    from learnforget.studies.study import apply_size, find_study, load_study

    paths = [f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    s, extra = apply_size(load_study(find_study("code_cpt")), None, paths)
    print_data_budget(expand(s, extra))  # offline, nothing prepared: the paper's size
    rows = _budget_rows(capsys.readouterr().out)
    assert len(rows) == 4
    for r in rows:
        assert r[1:8] == ["starcoder_python", "shards", "20B", "?", "?", "?", "no*"]
        assert r[8] == "unknown until prepared; the paper reports 20B tokens"

    # the toy size, its corpus prepared, with a last budget beyond it: unique + repeated
    s, extra = apply_size(load_study(find_study("code_cpt")), "toy",
                          [*paths, "train.checkpoints.at=[10,2000]"])
    plan = expand(s, extra)
    job = plan.jobs[0]
    m = json.loads((ensure_corpus(job.cfg.data, job.cfg.model, tok, tmp_path / "cache")
                    / "manifest.json").read_text())
    print_data_budget(plan)
    rows = _budget_rows(capsys.readouterr().out)
    budget = 2000 * 4 * 64  # steps x batch x seq_len
    unique = m["n_train_tokens"] // 64 * 64  # every whole block of the corpus once
    assert budget > unique
    for r in rows:
        assert r[2:4] == ["shards", f"{budget / 1e3:.3g}K"]
        assert r[4] == f"{m['n_train_tokens'] / 1e3:.3g}K" and r[5] == f"{unique / 1e3:.3g}K"
        assert r[6] == f"{(budget - unique) / 1e3:.3g}K" and r[7] == "YES"
        assert r[8].startswith("data.max_docs=40: the corpus is cut at 40 documents; prepared:")


@pytest.mark.parametrize("args, words", [
    (["data=arith_ift"], "data=arith_ift has data.format=memory: nothing to prepare"),
    (["data.format=bogus"], "data.format 'bogus' is unknown (expected one of: memory, shards)"),
    (["data=arith_ift", "data.format=shards"],
     "data.format=shards is for continued pretraining (data.regime=cpt), not data.regime=ift"),
    (["data.shard_tokens=0", "data.format=shards", "data.max_docs=4"],
     "data.shard_tokens=0: expected a positive integer"),
])
def test_bad_data_settings_are_one_line_errors(args, words, capsys, tmp_path):
    from learnforget.cli import main

    assert main(["data", "prepare", f"paths.cache_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("learnforget: error: ") and words in err and err.count("\n") == 1


def test_data_prepare_command_writes_the_corpus_training_reads(tmp_path, capsys):
    from learnforget.cli import main
    from learnforget.config import compose
    from learnforget.data.shards import corpus_dir

    args = [f"paths.cache_dir={tmp_path}", "data.format=shards", "data.max_docs=6",
            "data.heldout_docs=1", "data.shard_tokens=5000"]
    assert main(["data", "prepare", *args]) == 0
    cfg = compose(args)
    m = json.loads((corpus_dir(tmp_path, cfg.data, cfg.model) / "manifest.json").read_text())
    assert m["complete"] and m["n_train_docs"] == 5 and m["heldout"]["docs"] == 1
    assert f"{m['n_train_tokens']:,} training tokens" in capsys.readouterr().out
    # training finds the prepared corpus (same tokenizer fingerprint) and reads it
    from conftest import FAST

    from learnforget.train.loop import train

    run = train(compose([*args, *FAST, f"paths.runs_dir={tmp_path / 'runs'}",
                         "train.num_threads=1"]))
    info = json.loads((run / "run.json").read_text())["train"]["data"]
    assert info["checksum"] == m["checksum"] and info["format"] == "shards"
    assert "tokenizing" not in capsys.readouterr().out
