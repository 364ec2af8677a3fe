"""The analysis of a study in W&B: one run (job_type `analysis`) in the study's group holding
its tables (as `wandb.Table`) and figures (as `wandb.Image`), so that opening the group shows
the study. Offline unless the user is online (the runs' own logger settings); a W&B failure
only turns this mirror off (one warning line), as for every stage.

A new table is one more entry in TABLES; figures are every PNG the analysis wrote.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from learnforget.runfolder import RunFolder

# (key in W&B, file in the analysis folder); entries whose file is absent are left out
TABLES: tuple[tuple[str, str], ...] = (
    ("runs", "runs.csv"),                          # every run x checkpoint: the study's table
    ("spectra", "spectra.csv"),                    # rank for 90% etc. per module
    ("matched_learning", "matched_learning.csv"),  # forgetting at matched learning
    ("matched_learning_drift", "matched_learning_drift.csv"),  # ... against drift KL
    ("intruders", "intruders.csv"),                # intruder dimensions per method and module
    ("lr_scaling", "lr_scaling.csv"),              # best LR per setting, ratio to full's
    ("rank_vs_gaussian", "rank_vs_gaussian.csv"),  # rank for 90% beside a Gaussian's
)
JOB_TYPE = "analysis"


def study_logger(run_dirs: Iterable[Path], root: Path) -> tuple[DictConfig | None, str]:
    """(the W&B logger settings of the first run that mirrored to W&B, or None when no run used
    logger=wandb; the W&B group: the runs' experiment name, or the root folder's name when they
    come from several experiments)."""
    logger: DictConfig | None = None
    experiments: set[str] = set()
    for run_dir in run_dirs:
        path = RunFolder(run_dir).config
        if not path.exists():
            continue
        cfg = OmegaConf.load(path)
        experiments.add(str(cfg.get("experiment_name", Path(run_dir).parent.name)))
        if logger is None and (cfg.get("logger") or {}).get("name") == "wandb":
            logger = cfg.logger
    group = experiments.pop() if len(experiments) == 1 else Path(root).resolve().name
    return logger, group


def default_logger() -> DictConfig:
    """conf/logger/wandb.yaml's settings, for `analyze --wandb` on runs that did not use W&B."""
    return OmegaConf.create({"name": "wandb", "mode": "auto", "project": "learnforget",
                             "entity": None, "tags": []})


def entries(out: Path, figures: Iterable[Path]) -> dict[str, Any]:
    """What the analysis run logs: {"table/<key>": wandb.Table, "figure/<stem>": wandb.Image}."""
    import pandas as pd
    import wandb

    logged: dict[str, Any] = {}
    for key, name in TABLES:
        path = Path(out) / name
        if path.exists() and path.stat().st_size > 0:
            try:
                frame = pd.read_csv(path)
            except pd.errors.EmptyDataError:  # a table with no rows (e.g. no LR search here)
                continue
            logged[f"table/{key}"] = wandb.Table(dataframe=frame)
    for fig in sorted({Path(f) for f in figures if Path(f).suffix == ".png"}):
        rel = fig.relative_to(out) if fig.is_relative_to(out) else Path(fig.name)
        logged[f"figure/{rel.with_suffix('').as_posix()}"] = wandb.Image(str(fig))
    return logged


def log_analysis(out: Path, figures: Iterable[Path], *, logger_cfg: DictConfig, group: str,
                 n_rows: int) -> Path | None:
    """Log the analysis folder `out` to one W&B run in `group`; returns the folder W&B wrote
    into (out/wandb), or None when W&B is off or failed to start (with a warning)."""
    from learnforget.tracking import mirror_off, open_wandb

    name = f"{group}-analysis"
    lg = open_wandb(logger_cfg, run_dir=Path(out), run_name=name, group=group, job_type=JOB_TYPE,
                    config={"analysis_dir": str(out), "rows": n_rows},
                    tags=[JOB_TYPE], x_axis="step")
    if lg is None:
        return None
    try:
        lg.run.log({**entries(Path(out), figures), "step": 0})
        lg.run.summary["rows"] = n_rows
        lg.finish("finished")
    except Exception as e:
        mirror_off("logging the analysis failed", e)
        return None
    return Path(out) / "wandb"
