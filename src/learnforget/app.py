"""A task run as a Hydra app, so that `-m` multiruns and Hydra's launchers work: what
`learnforget train` and `learnforget job` run."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from learnforget.errors import ConfigError

HYDRA_FLAGS = ("-m", "--multirun", "--cfg", "-c", "--help", "-h", "--info", "--hydra-help",
               "--resolve", "--package", "-p", "--shell-completion", "-sc")


def _precheck(overrides: Sequence[str]) -> None:
    """Compose once up front so a bad override is a one-line error, not a Hydra traceback."""
    if any(a in HYDRA_FLAGS or a.startswith("hydra") for a in overrides):
        return
    from learnforget.config import compose, validate

    validate(compose(overrides))


def run_hydra(stage: str, task: Callable, overrides: Sequence[str]) -> int:
    """Run `task(cfg)` as a Hydra app (so -m multirun and launchers work)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from learnforget.config import conf_dir

    _precheck(overrides)

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def app(cfg):
        try:
            return task(cfg)
        except ConfigError as e:
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise  # the launcher records the failed job; the other jobs go on
            print(f"learnforget: error: {e}", file=sys.stderr)
            sys.exit(2)

    saved = sys.argv
    sys.argv = [f"learnforget-{stage}", *overrides]
    try:
        app()
    finally:
        sys.argv = saved
    return 0
