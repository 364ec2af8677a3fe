"""The forgetting positive control: a graded series of known forgetting, scored like any run.

    derived = scaled_run(Path("runs/controls/<full run>"), ts=(0.5, 1, 2, 4, 8))
    # then: learnforget eval <derived> eval=control500   (paired per item against the base)

A full-finetuning checkpoint θ1 of a run defines the update ΔW = θ1 - θ0 against the run's
base weights θ0. For each factor t the checkpoint θ0 + t·ΔW is written (every tensor of the
checkpoint, in float32) into a sibling run folder `<run>-scaled`, one checkpoint
`x<t>` per factor (`x00.50`, `x01.00`, ... so that names sort by t), with the source
checkpoint's manifest plus `{"scale": t, "source": ...}`. t = 1 reproduces the checkpoint
(to float32 rounding of θ0 + (θ1 - θ0)); t = 0 would be the base. Extrapolating (t > 1)
moves the weights ever further along the direction finetuning took, so forgetting grows with
t: the eval stage has to see it, paired against the base, at the sizes a study uses. The
folder is a run folder like any other (config, tokenizer, run.json with derived_from and a
note), so `learnforget eval` scores it and `learnforget analyze` tabulates it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from learnforget.errors import ConfigError
from learnforget.files import atomic_dir, atomic_write_json, read_json
from learnforget.runfolder import MANIFEST, RunFolder

DEFAULT_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)
WEIGHTS = "model.safetensors"


def scale_label(t: float) -> str:
    """The checkpoint label of factor t: 'x01.00', 'x00.50', 'x08.00' (sorts by t below 100)."""
    return f"x{t:05.2f}"


def _checked_scales(ts) -> list[float]:
    out = []
    for t in ts:
        try:
            v = float(t)
        except (TypeError, ValueError):
            raise ConfigError(f"scale factor {t!r} is not a number (expected e.g. 0.5, 1, 8)") \
                from None
        if not 0 <= v < 100:
            raise ConfigError(f"scale factor {t!r} is out of range (expected 0 <= t < 100)")
        out.append(v)
    if not out:
        raise ConfigError("no scale factors given (expected e.g. 0.5,1,2,4,8)")
    return sorted(set(out))


def scaled_state(base: dict[str, torch.Tensor], ckpt: dict[str, torch.Tensor], t: float
                 ) -> dict[str, torch.Tensor]:
    """θ0 + t·(θ1 - θ0) per tensor of the checkpoint, computed in float64 and stored in the
    checkpoint's dtype. A checkpoint tensor the base lacks is a ConfigError."""
    out = {}
    for name, w1 in ckpt.items():
        if name not in base:
            raise ConfigError(f"checkpoint tensor {name!r} is not in the base weights (expected "
                              "a full-finetuning checkpoint of the same model)")
        w0 = base[name]
        if w0.shape != w1.shape:
            raise ConfigError(f"tensor {name!r}: base shape {tuple(w0.shape)} != checkpoint "
                              f"shape {tuple(w1.shape)}")
        w = w0.double() + t * (w1.double() - w0.double())
        out[name] = w.to(w1.dtype).contiguous()
    return out


def scaled_run(run_dir: Path, ts=DEFAULT_SCALES, *, checkpoint: str | None = None,
               cache_dir: Path | None = None) -> Path:
    """Write the sibling run `<run>-scaled` with checkpoints θ0 + t·ΔW (module doc); factors
    already written are kept (a rerun resumes). Returns the derived folder."""
    from safetensors.torch import load_file, save_file

    from learnforget.analysis.weights import base_model_folder

    run_dir = Path(run_dir)
    source = RunFolder(run_dir)
    info = source.read_record()
    if info is None:
        raise ConfigError(f"{run_dir} is not a run folder (no run.json)")
    from learnforget.methods.registry import family

    if not family(info.run.method).reference:
        raise ConfigError(f"the scaled control needs a full-finetuning run, got "
                          f"method={info.run.method!r} in {run_dir} (expected full)")
    ckpts = source.checkpoint_dirs()
    if checkpoint is not None:
        ckpts = [c for c in ckpts if c.name == checkpoint]
    if not ckpts:
        raise ConfigError(f"checkpoint {checkpoint!r} is not in {run_dir} (expected one of "
                          f"{source.checkpoint_labels()})")
    src = ckpts[-1]
    if not (src / WEIGHTS).exists():
        raise ConfigError(f"{src} has no {WEIGHTS} (expected a full-weights checkpoint)")
    scales = _checked_scales(ts)
    base_dir = base_model_folder(run_dir, cache_dir)
    derived = RunFolder(run_dir.parent / f"{run_dir.name}-scaled")
    derived.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_json(src / MANIFEST) or {}
    todo = [t for t in scales if not (derived.checkpoint(scale_label(t)) / MANIFEST).exists()]
    if todo:
        theta0 = load_file(str(base_dir / WEIGHTS))
        theta1 = load_file(str(src / WEIGHTS))
        for t in todo:
            with atomic_dir(derived.checkpoint(scale_label(t))) as out:
                out.mkdir(parents=True)
                save_file(scaled_state(theta0, theta1, t), str(out / WEIGHTS),
                          metadata={"format": "pt"})
                for extra in src.iterdir():
                    if extra.name not in (WEIGHTS, MANIFEST) and extra.is_file():
                        shutil.copy2(extra, out / extra.name)
                atomic_write_json(out / MANIFEST, {**manifest, "scale": t,
                                                   "source": str(src)})
    if source.config.exists():
        shutil.copy2(source.config, derived.config)
    if source.tokenizer.is_dir():
        shutil.copytree(source.tokenizer, derived.tokenizer, dirs_exist_ok=True)
    note = (f"forgetting control: checkpoints are theta0 + t * (theta1 - theta0) of "
            f"{src.name} of {run_dir.name}, t in {scales}; not trained (t != 1 is no run's "
            "weights)")
    info.run = replace(info.run, name=derived.path.name, derived_from=str(run_dir),
                       method_summary=f"{info.run.method_summary}+scaled")
    info.train.notes = [*(info.train.notes or []), note]
    derived.write_record(info)
    (derived.path / "DERIVED.txt").write_text(json.dumps(
        {"from": str(src), "by": "learnforget.analysis.controls.scaled_run",
         "scales": scales}) + "\n")
    return derived.path
