"""A quiet console: while a stage runs, what the libraries say (lm-eval's INFO lines and its
per-task progress bars, transformers/datasets/peft warnings, Python warnings) goes to the
run's log file instead of the console, which keeps the harness's own lines, one progress bar
per stage and the results. `--verbose` (or LEARNFORGET_VERBOSE=1) leaves the console alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

VERBOSE_ENV = "LEARNFORGET_VERBOSE"
LOG_NAME = "run.log"  # <run>/run.log: every stage appends to it
# loggers that may carry their own console handler (and not propagate to the root logger)
LIBRARY_LOGGERS = ("transformers", "datasets", "peft", "accelerate", "huggingface_hub",
                   "lm-eval", "lm_eval", "bitsandbytes", "torch", "py.warnings")


def verbose() -> bool:
    """True when the user asked for the libraries' own console output."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class LogFile:
    """A file-like sink appending to `path`. Until the folder exists (a run folder is created
    only once its input is checked) text is held in memory; what never finds a folder is
    dropped at close."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._pending: list[str] = []

    def write(self, text: str) -> int:
        self._pending.append(text)
        if self.path.parent.is_dir():
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self._pending and self.path.parent.is_dir():
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(self._pending))
            self._pending.clear()

    def isatty(self) -> bool:
        return False


_SINKS: list[LogFile] = []


@contextlib.contextmanager
def library_output(path: Path, stage: str) -> Iterator[None]:
    """Route library log records and Python warnings to `path` (appended) while inside, unless
    verbose(). Library progress bars go there too inside `library_bars()`."""
    if verbose():
        yield
        return
    sink = LogFile(path)
    sink.write(f"== {stage} {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()})\n")
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    root = logging.getLogger()
    saved_root = root.handlers[:]
    root.handlers = [handler]
    saved = [_detach_console(logging.getLogger(name)) for name in LIBRARY_LOGGERS]
    logging.captureWarnings(True)
    _SINKS.append(sink)
    try:
        yield
    finally:
        _SINKS.remove(sink)
        logging.captureWarnings(False)
        root.handlers = saved_root
        for lg, removed, propagate in saved:
            for h in removed:
                lg.addHandler(h)
            lg.propagate = propagate
        sink.flush()


def _detach_console(lg: logging.Logger) -> tuple[logging.Logger, list[logging.Handler], bool]:
    """Take a library logger's console handlers off and let it propagate to the root logger
    (whose handler is the log file); returns what to put back. Other handlers stay."""
    removed = [h for h in lg.handlers if type(h) is logging.StreamHandler]  # not file handlers
    for h in removed:
        lg.removeHandler(h)
    propagate = lg.propagate
    lg.propagate = True
    return lg, removed, propagate


def quiet_wandb() -> None:
    """W&B's own log lines (service start and teardown, also at process exit) stay in its
    debug files under wandb/, off the console, unless verbose()."""
    if verbose():
        return
    lg = logging.getLogger("wandb")
    lg.propagate = False
    if not any(isinstance(h, logging.NullHandler) for h in lg.handlers):
        lg.addHandler(logging.NullHandler())  # else Python's last-resort handler prints


@contextlib.contextmanager
def library_bars() -> Iterator[None]:
    """Inside library_output: what libraries write to stderr (lm-eval's progress bars) goes
    to the log file. Bars the harness created before entering keep the console."""
    if not _SINKS:
        yield
        return
    with contextlib.redirect_stderr(_SINKS[-1]):  # type: ignore[type-var]
        yield
