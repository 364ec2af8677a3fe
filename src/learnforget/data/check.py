"""A user's local data read through once before anything is launched or trained.

`learnforget prepare` and `learnforget sweep` (before the first job is started or submitted)
call :func:`check_configs`: every distinct ``data.source=local`` set of the jobs is read the
way training reads it, so that a malformed JSON line, a file that is not UTF-8, an empty file
or a record without its field stops the launch with one line naming the file, the line and what
was expected, instead of failing every GPU job at its start. Built-in sources (stdlib,
synthetic) need no check; a hub set is checked by the job that downloads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from learnforget.data.settings import cfg_get, cfg_heldout_docs, cfg_regime, cfg_source
from learnforget.errors import ConfigError


def check_local_data(data_cfg: Any) -> str | None:
    """Read a local data set through once (as training reads it: at most data.max_docs
    records); raise a one-line ConfigError on bad data. None for other sources, else a line
    such as ``data=local_text (/x/corpus.jsonl): 120 records read, ok``."""
    if cfg_source(data_cfg) != "local":
        return None
    from learnforget.data.sources import iter_documents, load_source

    heldout = cfg_heldout_docs(data_cfg)
    if cfg_regime(data_cfg) == "cpt":  # streamed: a large corpus is never held in memory
        n = sum(1 for _ in iter_documents(data_cfg)[0])
    else:
        n = len(load_source(data_cfg)[0])
    where = f"data={cfg_get(data_cfg, 'name')} ({cfg_get(data_cfg, 'path')})"
    if n <= heldout:
        raise ConfigError(f"data.heldout_docs={heldout} leaves nothing to train on: {where} has "
                          f"only {n} records (lower data.heldout_docs or add records)")
    return f"{where}: {n} records read, ok"


def check_configs(cfgs: Sequence[Any]) -> list[str]:
    """:func:`check_local_data` for each distinct data config of these composed run configs."""
    from omegaconf import OmegaConf

    seen: set[str] = set()
    lines = []
    for cfg in cfgs:
        key = OmegaConf.to_yaml(cfg.data)
        if key in seen:
            continue
        seen.add(key)
        line = check_local_data(cfg.data)
        if line:
            lines.append(line)
    return lines
