"""model.init_from: start a run from another run's full-weight checkpoint instead of the base
weights (pretrain on one distribution, then finetune on another: sweeps/transfer.yaml).

The value is ``RUN/LABEL``: the checkpoint ``LABEL`` of the run folder ``RUN`` in the same
experiment, ``runs/<experiment_name>/RUN/checkpoints/LABEL/``; ``RUN/last``: its checkpoint of
the highest step (a study whose sizes train the source for different lengths). It is part of the run's identity
as written (a name, not a path, so that names do not depend on the machine); give the source
run a fixed ``run_name`` so that the name stays the same when its settings change. The source's
manifest and config hash go into the run's notes (run.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from learnforget.errors import ConfigError
from learnforget.runfolder import RunFolder

WEIGHTS = "model.safetensors"
LAST = "last"


def init_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint folder model.init_from names (None when it is unset); a ConfigError
    when the value is not RUN/LABEL."""
    value = cfg.model.get("init_from")
    if value in (None, ""):
        return None
    parts = str(value).strip("/").split("/")
    if len(parts) != 2 or not all(parts) or ".." in parts:
        raise ConfigError(f"model.init_from={value!r} is not valid (expected RUN/LABEL: a run "
                          f"folder of experiment {cfg.experiment_name} and one of its checkpoint "
                          "labels, e.g. src-tiny/step-400)")
    folder = RunFolder(Path(cfg.paths.runs_dir).resolve() / str(cfg.experiment_name) / parts[0])
    if parts[1] != LAST:
        return folder.checkpoint(parts[1])
    record = folder.read_record() if folder.path.is_dir() else None
    steps = {label: int(m.get("step") or 0) for label, m in folder.manifests().items()}
    if record is None or record.status != "finished" or not steps:
        raise ConfigError(f"model.init_from={value!r}: the run {folder.path} has not finished "
                          "(train that run first)")
    return folder.checkpoint(max(steps, key=steps.__getitem__))


def load_init(model: torch.nn.Module, cfg: DictConfig) -> list[str]:
    """Load model.init_from's weights into `model` (the base model, before the method wraps it);
    the notes for run.json ([] when unset)."""
    ckpt = init_checkpoint(cfg)
    if ckpt is None:
        return []
    from safetensors.torch import load_file

    value = cfg.model.init_from
    weights = ckpt / WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"model.init_from={value!r}: no full-weight checkpoint at {weights} "
                          "(train that run first; adapter checkpoints cannot initialise a model)")
    try:
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    except RuntimeError as e:  # a shape mismatch: another architecture
        raise ConfigError(f"model.init_from={value!r}: its weights do not fit model="
                          f"{cfg.model.name} ({str(e).splitlines()[0]})") from None
    if missing or unexpected:
        raise ConfigError(f"model.init_from={value!r}: its weights do not fit model="
                          f"{cfg.model.name} (missing {sorted(missing)[:3]}, unexpected "
                          f"{sorted(unexpected)[:3]})")
    manifest = ckpt / "manifest.json"
    info = json.loads(manifest.read_text()) if manifest.is_file() else {}
    record = RunFolder(ckpt.parent.parent).read_record() if ckpt.parent.parent.is_dir() else None
    chash = getattr(getattr(record, "run", None), "config_hash", None)
    return [f"model.init_from={value}: weights from {ckpt} (step {info.get('step')}, "
            f"{info.get('tokens')} tokens, held-out loss {info.get('heldout_loss')}; source "
            f"config hash {chash}), not the base model's"]
