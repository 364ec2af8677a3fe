"""A quiet console: library log lines, warnings and lm-eval's progress bars go to the run's
log file (<run>/run.log); the console keeps the harness's own lines and the results;
--verbose (LEARNFORGET_VERBOSE=1) brings the libraries' output back."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest
from conftest import FAST

from learnforget.cli import main
from learnforget.console import VERBOSE_ENV, LogFile, library_bars, library_output


def _speak() -> None:
    """What libraries do during a stage: log, warn, draw a bar on stderr."""
    logging.getLogger("lm_eval.evaluator").warning("lm-eval says hello")
    logging.getLogger("transformers.modeling_utils").warning("transformers says hello")
    warnings.warn("a library warning", UserWarning, stacklevel=1)
    with library_bars():
        sys.stderr.write("Running loglikelihood requests: 100%\n")


def test_library_output_goes_to_the_log_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    log = tmp_path / "run" / "run.log"
    log.parent.mkdir()
    root_handlers = logging.getLogger().handlers[:]
    with library_output(log, "eval smoke"):
        _speak()
        print("learnforget: the harness's own line")
    captured = capsys.readouterr()
    assert captured.out == "learnforget: the harness's own line\n"
    assert "hello" not in captured.err and "Running" not in captured.err
    text = log.read_text()
    assert text.startswith("== eval smoke ")
    for line in ("[lm_eval.evaluator][WARNING] lm-eval says hello",
                 "[transformers.modeling_utils][WARNING] transformers says hello",
                 "a library warning", "Running loglikelihood requests: 100%"):
        assert line in text, line
    assert logging.getLogger().handlers == root_handlers  # restored


def test_verbose_leaves_the_console_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(VERBOSE_ENV, "1")
    log = tmp_path / "run.log"
    with library_output(log, "train"), pytest.warns(UserWarning, match="a library warning"):
        _speak()
    assert "Running loglikelihood requests" in capsys.readouterr().err
    assert not log.exists()


def test_the_log_waits_for_its_folder(tmp_path):
    sink = LogFile(tmp_path / "run" / "run.log")
    sink.write("before the run folder exists\n")
    assert not (tmp_path / "run").exists()  # bad input writes nothing
    (tmp_path / "run").mkdir()
    sink.write("after\n")
    assert (tmp_path / "run" / "run.log").read_text() == "before the run folder exists\nafter\n"


@pytest.mark.parametrize("verbose", [False, True])
def test_train_then_eval_console(runs_dir, cache_dir, monkeypatch, capfd, verbose):
    """`learnforget train eval.after_train=true`: lm-eval's lines only with --verbose."""
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    monkeypatch.setenv("LEARNFORGET_RUNS_DIR", str(runs_dir))
    monkeypatch.setenv("LEARNFORGET_CACHE_DIR", str(cache_dir))
    args = ["train", *FAST, "data.max_docs=8", "data.heldout_docs=2", "method.r=4",
            "eval=smoke", "eval.limit=2", "eval.max_gen_toks=8", "eval.diversity.prompts=[]",
            "eval.after_train=true"]
    assert main(args + (["--verbose"] if verbose else [])) == 0
    out, err = capfd.readouterr()
    console = out + err
    assert "finished: 2 steps" in console and "forgetting_score" in console  # results table
    (run,) = (runs_dir / "default").iterdir()
    log = (run / "run.log").read_text() if (run / "run.log").exists() else ""
    if verbose:
        assert "lm_eval" in console and "Running loglikelihood requests" in console
    else:
        assert "lm_eval" not in console and "Running loglikelihood requests" not in console
        assert "== train " in log and "== eval smoke " in log
        assert "lm_eval" in log and "Running loglikelihood requests" in log


def test_wandb_lines_stay_off_the_console(monkeypatch, capsys):
    """W&B logs its service teardown at process exit, after every stage: not to the console."""
    from learnforget.console import quiet_wandb

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    wandb_logger = logging.getLogger("wandb")
    monkeypatch.setattr(wandb_logger, "propagate", True)
    monkeypatch.setattr(wandb_logger, "handlers", [])
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        quiet_wandb()
        logging.getLogger("wandb.sdk.lib.service").warning("Reached EOF.")
    finally:
        logging.getLogger().removeHandler(handler)
    assert seen == [] and "Reached EOF" not in capsys.readouterr().err
