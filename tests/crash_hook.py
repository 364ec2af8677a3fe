"""Fault injection for the crash/resume tests, through the loop's ordinary `train.callbacks`:
`crash_hook.die_after_step_N` ends the training process right after step N (its checkpoint, if
any, saved) with os._exit(137): no clean-up and no final write, as a SIGKILL would. Production
code has no branch for it; `crash_after` gives a subprocess the override and the PYTHONPATH
that make this module importable there."""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIX = "die_after_step_"


def __getattr__(name: str):
    if not name.startswith(PREFIX):
        raise AttributeError(name)
    at = int(name.removeprefix(PREFIX))

    def die_after_step(step: int, **_) -> None:
        if step == at:
            os._exit(137)

    return die_after_step


def crash_after(step: int | None, env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(the environment, the overrides) that make `learnforget train` die after `step`
    (None: `env` unchanged, no override)."""
    if step is None:
        return env, []
    path = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path}, [f"train.callbacks=[crash_hook.{PREFIX}{step}]"]
