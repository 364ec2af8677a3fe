"""Bad user data (issue 29, item 5): a malformed JSON line, a file that is not UTF-8, an empty
file and a record without its field each stop `train`, `prepare` and `sweep` with one line
naming the file, the line and what was expected, before anything is trained or launched.
The expected lines are written out here in full (docs/faults.md quotes them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAST

from learnforget.cli import main
from learnforget.errors import ConfigError
from learnforget.studies.command import sweep_main

TEXT = '{"text": "..."}'
PAIR = '{"prompt": "...", "response": "..."}'

# name -> (file name, bytes, data set, the error after "learnforget: error: ", with {p} the path)
CASES = {
    "malformed line": (
        "corpus.jsonl", b'{"text": "one"}\n{"text": "two", \n{"text": "three"}\n', "local_text",
        "data.path: {p}:2 is not valid JSON (Expecting property name enclosed in double quotes "
        f"at column 17): expected one record a line, each a JSON object like {TEXT}"),
    "not UTF-8": (
        "corpus.jsonl", b'{"text": "one"}\n{"text": "caf\xe9 au lait"}\n', "local_text",
        "data.path: {p}:2 is not UTF-8 text (byte 0xe9 at column 14): expected a UTF-8 file "
        "(convert it, e.g. iconv -f latin1 -t utf-8)"),
    "empty file": (
        "corpus.jsonl", b"", "local_text",
        "data.path: {p} is empty (0 bytes): expected one record a line, each a JSON object "
        f"like {TEXT}"),
    "blank file": (
        "corpus.jsonl", b"\n  \n", "local_text",
        "data.path: {p} is blank (only white space): expected one record a line, each a JSON "
        f"object like {TEXT}"),
    "missing field": (
        "corpus.jsonl", b'{"text": "one"}\n{"body": "two"}\n{"text": "three"}\n', "local_text",
        "data.text_field='text': the record at {p}:2 has no field 'text' (keys present: "
        "['body'])"),
    "missing response": (
        "pairs.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "answer": "d"}\n',
        "local_instruct",
        "data.response_field='response': the record at {p}:2 has no field 'response' (keys "
        "present: ['answer', 'prompt'])"),
    "malformed pair": (
        "pairs.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "c" "response": "d"}\n',
        "local_instruct",
        "data.path: {p}:2 is not valid JSON (Expecting ',' delimiter at column 16): expected one "
        f"record a line, each a JSON object like {PAIR}"),
    "not a record": (
        "corpus.jsonl", b'{"text": "one"}\n["two"]\n', "local_text",
        "{p}:2: expected a JSON object (a record), got list"),
    "txt not UTF-8": (
        "book.txt", b"line one\nline two\nna\xefve\n", "local_text",
        "data.path: {p}:3 is not UTF-8 text (byte 0xef at column 3): expected a UTF-8 file "
        "(convert it, e.g. iconv -f latin1 -t utf-8)"),
    "txt empty": ("book.txt", b"", "local_text",
                  "data.path: {p} is empty: expected one text document"),
}


def _write(tmp_path: Path, case: str) -> tuple[Path, str, str]:
    name, data, dataset, expected = CASES[case]
    path = tmp_path / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, dataset, expected.replace("{p}", str(path))


@pytest.fixture
def cli(tmp_path, cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("LEARNFORGET_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LEARNFORGET_CACHE_DIR", str(tmp_path / "cache"))

    def run(*args: str) -> tuple[int, list[str]]:
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        return code, [x for x in err.splitlines() if x.startswith("learnforget: error:")]

    return run


def _trained_nothing(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    written = [p for p in runs.rglob("*") if p.is_file() and "_hydra" not in p.parts] \
        if runs.exists() else []
    assert written == []  # no run folder, no checkpoint, no metrics
    shards = tmp_path / "cache" / "shards"
    assert not shards.exists() or not list(shards.rglob("*.bin"))


@pytest.mark.parametrize("fmt", ["memory", "shards"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_stops_prepare_with_one_line(cli, tmp_path, case, fmt):
    path, dataset, expected = _write(tmp_path, case)
    if fmt == "shards" and dataset == "local_instruct":
        pytest.skip("token shards are for continued pretraining only")
    code, lines = cli("prepare", "model=tiny_llama", f"data={dataset}", f"data.path={path}",
                      f"data.format={fmt}", "data.heldout_docs=1")
    assert code == 2 and lines == [f"learnforget: error: {expected}"]
    _trained_nothing(tmp_path)


@pytest.mark.parametrize("case", ["malformed line", "not UTF-8", "empty file", "missing field"])
def test_bad_data_stops_train_before_any_step(cli, tmp_path, case):
    path, dataset, expected = _write(tmp_path, case)
    code, lines = cli("train", *FAST, f"data={dataset}", f"data.path={path}",
                      "data.heldout_docs=1")
    assert code == 2 and lines == [f"learnforget: error: {expected}"]
    _trained_nothing(tmp_path)


def test_bad_data_stops_a_sweep_before_any_job(tmp_path, capsys):
    path, _, expected = _write(tmp_path, "not UTF-8")
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError) as err:
        sweep_main("demo_tiny", [f"paths.runs_dir={runs}", f"paths.cache_dir={tmp_path / 'c'}",
                                 "data=local_text", f"data.path={path}", "data.heldout_docs=1"],
                   launcher="basic")
    assert str(err.value) == expected
    assert not runs.exists() or not [p for p in runs.rglob("*") if p.is_file()]


def test_good_local_data_passes_the_check_and_a_bad_line_past_max_docs_is_not_read(tmp_path):
    from learnforget.config import compose
    from learnforget.data.check import check_configs

    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}\nnot json\n')
    cfg = compose(["data=local_text", f"data.path={path}", "data.heldout_docs=1",
                   "data.max_docs=3"])
    assert check_configs([cfg, cfg]) == [f"data=local_text ({path}): 3 records read, ok"]
    bom = tmp_path / "bom.jsonl"  # a byte-order mark (Windows editors) is not an error
    bom.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    cfg = compose(["data=local_text", f"data.path={bom}", "data.heldout_docs=1"])
    assert check_configs([cfg]) == [f"data=local_text ({bom}): 2 records read, ok"]
    few = compose(["data=local_text", f"data.path={bom}", "data.heldout_docs=2"])
    with pytest.raises(ConfigError, match="data.heldout_docs=2 leaves nothing to train on"):
        check_configs([few])


def test_a_folder_with_a_file_that_is_not_utf8_names_that_file(tmp_path):
    from learnforget.config import compose
    from learnforget.data.sources import load_records

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("fine\n")
    (folder / "b.md").write_bytes(b"# title\n\xff\n")
    with pytest.raises(ConfigError) as err:
        load_records(compose(["data=local_text", f"data.path={folder}"]).data)
    assert str(err.value).startswith(f"data.path: {folder / 'b.md'}:2 is not UTF-8 text (byte "
                                     "0xff at column 1)")
