"""Production configs, studies and code never read the test suite's files: the built-in suites'
small data files ship with the package (learnforget/assets/suite_data/, `package:<file>`)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from learnforget.assets.eval_data import SUITE_DATA, suite_file
from learnforget.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TESTS_PATH = re.compile(r"(?<![\w.-])tests/")


def _mentions(folder: Path, root: Path = ROOT) -> list[str]:
    """``file:line: text`` for every line of a text file under `folder` naming ``tests/``."""
    hits = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part == "__pycache__" or part.endswith(".egg-info")
                                      for part in path.parts):
            continue  # build outputs (pip's egg-info lists every file, tests/ included)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if TESTS_PATH.search(line):
                hits.append(f"{path.relative_to(root)}:{i}: {line.strip()[:100]}")
    return hits


def test_the_pattern_finds_a_path_into_tests(tmp_path):
    (tmp_path / "suite.yaml").write_text("data: tests/fixtures/eval/x.jsonl\n")
    (tmp_path / "ok.yaml").write_text("data: package:x.jsonl  # mytests/ is another folder\n")
    assert [h.split(":")[0] for h in _mentions(tmp_path, tmp_path)] == ["suite.yaml"]


@pytest.mark.parametrize("folder", ["conf", "sweeps", "src"])
def test_nothing_in_production_names_tests(folder):
    hits = _mentions(ROOT / folder)
    assert hits == [], "production files name tests/:\n" + "\n".join(hits)


def test_the_built_in_suites_read_package_data():
    for suite in ("smoke", "demo_tiny"):
        cfg = OmegaConf.load(ROOT / "conf" / "eval" / f"{suite}.yaml")
        values = [t["data"] for t in cfg.get("tasks", [])] + \
            [p["path"] for p in cfg.get("ppl", []) if p.get("source") == "file"]
        assert values and all(v.startswith("package:") for v in values), (suite, values)
        for v in values:
            assert suite_file(v.removeprefix("package:"), "t").is_file()


def test_suite_file_errors_name_the_file_and_the_choices():
    assert suite_file("hellaswag.jsonl", "t") == SUITE_DATA / "hellaswag.jsonl"
    with pytest.raises(ConfigError, match=r"package:nope.jsonl .*expected one of \[.*'hellaswag.jsonl'"):
        suite_file("nope.jsonl", "t")
    with pytest.raises(ConfigError, match="package:../x"):
        suite_file("../x", "t")
