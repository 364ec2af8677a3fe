"""Scoring a base model alone, without a trained run:

    learnforget eval model=smollm2_135m eval=offline

scores the base model (QLoRA: its quantised base) on the suite into the base cache under
runs/_base/<model>/, which every run's eval with the same suite settings then reuses.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from learnforget.eval.scoring import base_model_id, base_scores, drift_eval_for
from learnforget.eval.suite import body_dtype, checked_specs, eval_key, head_note
from learnforget.eval.summary import print_rows, summarize
from learnforget.methods.registry import method_of
from learnforget.runfolder import base_dir, runs_root


def evaluate_base(cfg: DictConfig) -> Path:
    """Score the base model of cfg.model (QLoRA: its quantised base) on suite cfg.eval without
    a trained run, into the base cache that every run's eval then reuses (runs/_base/).
    Returns the cache file."""
    from learnforget.console import LOG_NAME, library_output

    folder = base_dir(runs_root(cfg), base_model_id(cfg))
    with library_output(folder / LOG_NAME, f"eval {cfg.eval.name} (base model)"):
        return _evaluate_base(cfg)


def _evaluate_base(cfg: DictConfig) -> Path:
    from learnforget.assets.models import load_model
    from learnforget.eval.task_yaml import write_task_dir

    ev = cfg.eval
    cache_dir = Path(cfg.paths.cache_dir).expanduser()
    root = runs_root(cfg)
    specs = checked_specs(ev, cache_dir)
    model_id = base_model_id(cfg)
    include_path = write_task_dir(specs, base_dir(root, model_id) / "tasks") if specs else root
    key = eval_key(ev, specs, include_path, body_dtype=body_dtype(ev, cfg))
    if note := head_note(ev, cfg):
        print(f"learnforget: {note}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base_method = method_of(cfg.method).base_config(cfg.method)  # a quantised base: its own
    model, tokenizer, _ = load_model(cfg.model, base_method, cache_dir, device)
    model.eval()
    drift_eval = drift_eval_for(ev, cfg, root, tokenizer, lambda: model)
    base = base_scores(cfg, ev, key, root, tokenizer, specs, include_path, cache_dir,
                       device, drift_eval, model=model)
    print_rows([{"checkpoint": "base", "step": 0, "tokens": 0, **summarize(base, base)}])
    print(f"learnforget: base scores of {model_id} on eval={ev.name}: {base['cache_file']}")
    return Path(base["cache_file"])
