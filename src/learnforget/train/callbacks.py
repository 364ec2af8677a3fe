"""train.callbacks: functions the training loop calls after every optimizer step.

Each entry of `train.callbacks` is an import path `package.module.function` (importable in the
training process: installed, or on PYTHONPATH). On every rank, after step `step` is done and
the checkpoint or cooldown branch point of that step (if any) is saved, the loop calls

    function(step=step, progress={"step", "tokens", "sequences", "wall_time_s"},
             run_dir=Path, rank=int)

and ignores what it returns. Uses: profiling or logging one's own numbers at chosen steps,
stopping a run from outside, fault injection (a hook that ends the process like a kill, as the
crash/resume tests do). The list is not part of the run's identity: a run resumed without
its callbacks is the same run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from learnforget.errors import ConfigError

Callback = Callable[..., Any]


def load_callbacks(paths: Sequence[str] | None) -> list[Callback]:
    """The functions named by `train.callbacks`; a name that does not import is a ConfigError."""
    out = []
    for path in paths or []:
        module, _, attr = str(path).rpartition(".")
        if not module or not attr:
            raise ConfigError(f"train.callbacks entry {path!r} is not an import path (expected "
                              "package.module.function)")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"train.callbacks entry {path!r} cannot be imported ({e}); expected "
                              "package.module.function importable in the training process") from e
        if not callable(fn):
            raise ConfigError(f"train.callbacks entry {path!r} is not callable")
        out.append(fn)
    return out


def call_callbacks(callbacks: Sequence[Callback], **info: Any) -> None:
    for fn in callbacks:
        fn(**info)
