"""Files cut short (a crash, a full disk): a result file that does not parse is recomputed
with a one-line warning (eval scores, base cache, spectra, drift references); a run.json that
does not parse is a one-line error naming the file."""

from __future__ import annotations

import json

import pytest
from conftest import FAST, OFFLINE_DATA

from learnforget.analysis.spectra import compute_spectra
from learnforget.cli import main
from learnforget.config import compose
from learnforget.eval.stage import evaluate_run
from learnforget.studies.job import spectra_complete
from learnforget.train.loop import fit, setup

SMOKE = ["eval=smoke", "eval.limit=2", "eval.max_gen_toks=8", "eval.diversity.prompts=[]",
         "method.r=4"]


def _cut(path) -> None:
    """Keep the first half of the file, as a writer killed mid-write without atomic rename."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, cache_dir):
    """One trained and scored run for the module (each test leaves it whole again)."""
    runs = tmp_path_factory.mktemp("corrupt") / "runs"
    cfg = compose([f"paths.runs_dir={runs}", f"paths.cache_dir={cache_dir}", *FAST,
                   *OFFLINE_DATA["stdlib_code"], *SMOKE])
    out = fit(setup(cfg))
    evaluate_run(out, cfg.eval)
    return cfg, out


def test_a_truncated_eval_result_is_recomputed(scored_run, capsys):
    cfg, out = scored_run
    first = json.loads((out / "eval/step-000001.json").read_text())
    other = out / "eval/step-000002.json"
    stamp = other.stat().st_mtime_ns
    _cut(out / "eval/step-000001.json")
    capsys.readouterr()
    evaluate_run(out, cfg.eval)
    err = capsys.readouterr().err
    warnings = [x for x in err.splitlines() if "does not parse" in x]
    assert len(warnings) == 1 and "step-000001.json" in warnings[0] and "recomputing" in warnings[0]
    again = json.loads((out / "eval/step-000001.json").read_text())
    assert again["tasks"].keys() == first["tasks"].keys()
    assert again["ppl"]["target_heldout"]["ce"] == pytest.approx(first["ppl"]["target_heldout"]["ce"])
    assert other.stat().st_mtime_ns == stamp  # the whole file was reused


def test_a_truncated_base_cache_is_recomputed(scored_run, capsys):
    cfg, out = scored_run
    (cache,) = (out.parents[1] / "_base").rglob("*.json")
    ce = json.loads(cache.read_text())["ppl"]["general_text"]["ce"]
    _cut(cache)
    capsys.readouterr()
    evaluate_run(out, cfg.eval)
    captured = capsys.readouterr()
    assert f"{cache} does not parse" in captured.err
    assert "scoring the base model" in captured.out
    assert json.loads(cache.read_text())["ppl"]["general_text"]["ce"] == pytest.approx(ce)


def test_a_truncated_eval_summary_makes_the_eval_stage_incomplete(scored_run):
    from learnforget.studies.job import eval_complete

    cfg, out = scored_run
    assert eval_complete(out, "smoke")
    _cut(out / "eval/summary-smoke.json")
    assert not eval_complete(out, "smoke")
    evaluate_run(out, cfg.eval)  # every result reused, the summary written again
    assert eval_complete(out, "smoke")


def test_a_truncated_spectra_file_is_recomputed(make_cfg, capsys):
    out = fit(setup(make_cfg("method.r=4")))
    paths = compute_spectra(out, verbose=False)
    rows = json.loads(paths[0].read_text())["rows"]
    assert spectra_complete(out)
    _cut(paths[0])
    assert not spectra_complete(out)
    capsys.readouterr()
    compute_spectra(out, verbose=False)
    assert f"{paths[0]} does not parse" in capsys.readouterr().err
    again = json.loads(paths[0].read_text())["rows"]
    assert [r["rank_for_variance"] for r in again] == [r["rank_for_variance"] for r in rows]
    assert spectra_complete(out)


def test_truncated_drift_references_are_regenerated(tmp_path, capsys):
    from learnforget.eval.drift_refs import load_references, save_references

    path = tmp_path / "drift-refs-abc.json"
    save_references({"key": "k", "texts": ["a"]}, path)
    assert load_references(path)["key"] == "k"
    _cut(path)
    assert load_references(path) is None
    assert "does not parse" in capsys.readouterr().err


def test_a_truncated_run_json_is_a_one_line_error(runs_dir, cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("LEARNFORGET_RUNS_DIR", str(runs_dir))
    monkeypatch.setenv("LEARNFORGET_CACHE_DIR", str(cache_dir))
    args = ["train", *FAST, "data.max_docs=8", "data.heldout_docs=2", "method.r=4"]
    assert main(args) == 0
    (run,) = (runs_dir / "default").iterdir()
    _cut(run / "run.json")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"learnforget: error: {run / 'run.json'} is not valid JSON (")
    assert "repair or remove it" in err[0]
