"""The eval stage: each checkpoint of a run -> target and forgetting scores, against the base
model's scores (computed once per model and eval settings, then cached).

    learnforget eval runs/default/<run name> eval=offline
    learnforget eval model=smollm2_135m method=lora data=stdlib_code eval=offline  # same run
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from learnforget.errors import ConfigError
from learnforget.eval.scoring import (
    base_model_id,
    base_scores,
    drift_eval_for,
    load_for_eval,
    score,
)
from learnforget.eval.suite import body_dtype, checked_specs, eval_key, head_note
from learnforget.eval.summary import print_rows, summarize, write_csv
from learnforget.eval.swap import NOTE as SWAP_NOTE
from learnforget.eval.swap import BasePool
from learnforget.files import atomic_write_json, read_result
from learnforget.runfolder import RunFolder, meta_info


def evaluate_run(run_dir: Path, ev: DictConfig, logger_cfg: DictConfig | None = None,
                 cache_dir: Path | None = None, pool: BasePool | None = None) -> Path:
    """Evaluate every checkpoint of a run folder (or ev.checkpoint); returns the summary path.
    What the libraries log goes to <run>/run.log (learnforget.console). Adapter checkpoints
    share one loaded base (eval.swap_adapters, learnforget.eval.swap): `pool` keeps it across
    calls (evaluate_runs), else it lives for this call."""
    from learnforget.console import library_output

    with library_output(RunFolder(Path(run_dir).resolve()).log, f"eval {ev.name}"):
        return _evaluate_run(run_dir, ev, logger_cfg, cache_dir, pool or BasePool())


def evaluate_runs(run_dirs, ev: DictConfig, logger_cfg: DictConfig | None = None,
                  cache_dir: Path | None = None) -> list[Path]:
    """Evaluate several run folders in this process; runs on the same base model whose
    checkpoints are adapters share one loaded base (learnforget.eval.swap)."""
    pool = BasePool()
    return [evaluate_run(Path(d), ev, logger_cfg, cache_dir, pool) for d in run_dirs]


def _evaluate_run(run_dir: Path, ev: DictConfig, logger_cfg: DictConfig | None,
                  cache_dir: Path | None, pool: BasePool) -> Path:
    from learnforget.assets.models import load_tokenizer
    from learnforget.eval.task_yaml import write_task_dir

    folder = RunFolder(Path(run_dir).resolve())
    run_dir = folder.path
    if not folder.config.exists():
        raise ConfigError(f"{run_dir} is not a run folder (no {folder.config.name}): train it "
                          "first")
    run_cfg = OmegaConf.load(folder.config)
    cache_dir = Path(cache_dir or run_cfg.paths.cache_dir).expanduser()
    ckpts = folder.checkpoint_dirs()
    if not ckpts:
        raise ConfigError(f"run folder {run_dir} has no checkpoints (train it first, or wait "
                          "for its first checkpoint)")
    if ev.checkpoint:
        ckpts = [p for p in ckpts if p.name == ev.checkpoint]
        if not ckpts:
            raise ConfigError(f"eval.checkpoint={ev.checkpoint!r} is not a checkpoint of "
                              f"{run_dir.name}")
    specs = checked_specs(ev, cache_dir)
    include_path = write_task_dir(specs, folder.eval_tasks) if specs else run_dir
    key = eval_key(ev, specs, include_path, body_dtype=body_dtype(ev, run_cfg))
    if note := head_note(ev, run_cfg):
        print(f"learnforget: {note}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shared = pool.for_run(run_cfg, ev, cache_dir, device)
    if shared is not None:
        print(f"learnforget: {SWAP_NOTE}")
    tokenizer = load_tokenizer(str(folder.tokenizer))
    drift_eval = drift_eval_for(ev, run_cfg, folder.runs_root, tokenizer,
                                lambda: load_for_eval(run_cfg, None, cache_dir, device))
    task_cache: dict = {}  # lm-eval's task objects, built once for the base and every checkpoint
    base = base_scores(run_cfg, ev, key, folder.runs_root, tokenizer, specs, include_path,
                       cache_dir, device, drift_eval, task_cache=task_cache,
                       load_base=shared.base_model if shared is not None else None)

    from learnforget.tracking import mirror_loggers

    loggers = mirror_loggers(logger_cfg, run_dir=run_dir, run_name=run_dir.name,
                             group=str(run_cfg.experiment_name), job_type="eval",
                             config={"eval": OmegaConf.to_container(ev, resolve=True)},
                             tags=[run_cfg.method.name, run_cfg.data.name, ev.name],
                             x_axis="tokens")
    rows = [{"checkpoint": "base", "step": 0, "tokens": 0, **summarize(base, base)}]
    for ckpt in tqdm(ckpts, desc=f"eval {run_dir.name[:30]}", disable=None):
        manifest = folder.manifest(ckpt.name)
        out = folder.eval_result(ckpt.name)
        result = read_result(out)
        if not (result and result.get("eval_key") == key):
            model = shared.checkpoint_model(ckpt) if shared is not None else None
            adapter_load = "swapped onto the shared base" if model is not None else "fresh"
            if model is None:
                model = load_for_eval(run_cfg, ckpt, cache_dir, device)
            result = {"checkpoint": ckpt.name, "step": manifest["step"],
                      "tokens": manifest["tokens"], "epoch": manifest.get("epoch"),
                      "eval_key": key, "suite": ev.name, "batch_size": int(ev.batch_size),
                      "seed": int(ev.seed), "limit": ev.limit,
                      **score(model, tokenizer, run_cfg, ev, specs, include_path, cache_dir,
                              drift_eval, task_cache),
                      "meta": meta_info().to_dict()}
            result["meta"]["precision"] = result["precision"]
            result["meta"]["head"] = result["head"]
            result["meta"]["adapter_load"] = adapter_load
            atomic_write_json(out, result)
            del model
        _same_precision(base, result, ckpt.name)
        row = {"checkpoint": ckpt.name, "step": result["step"], "tokens": result["tokens"],
               **summarize(result, base)}
        rows.append(row)
        loggers.log(row)
    summary = {"run": run_dir.name, "suite": ev.name, "eval_key": key,
               "base_scores": str(folder.base_root), "rows": rows}
    path = folder.eval_summary(ev.name)
    atomic_write_json(path, summary)
    write_csv(path.with_suffix(".csv"), rows)
    loggers.summary({"eval_suite": ev.name})
    loggers.finish("finished")
    print_rows(rows)
    return path


def _same_precision(base: dict, result: dict, label: str) -> None:
    """A paired change needs the base and the checkpoint scored in one precision, with their
    LM heads' logits in one dtype (results from before eval.head record no head)."""
    b = (base.get("precision") or {}).get("setting", "model")
    c = (result.get("precision") or {}).get("setting", "model")
    if b != c:
        raise ConfigError(f"checkpoint {label} was scored with eval.precision={c!r}, the base "
                          f"with {b!r}: delete one of the results to rescore it")
    bh, ch = (base.get("head") or {}).get("logits"), (result.get("head") or {}).get("logits")
    if bh and ch and bh != ch:
        raise ConfigError(f"checkpoint {label} was scored with {ch} LM-head logits, the base "
                          f"with {bh}: delete one of the results to rescore it")


def eval_main(cfg: DictConfig, run_dir: Path | None = None) -> Path:
    """Evaluate the run that `cfg` names (or the given folder) with suite cfg.eval. With no
    folder given and no run folder for `cfg`, score the base model alone (learnforget.eval.base)."""
    from learnforget.config import run_dir as derive_run_dir

    target = Path(run_dir) if run_dir else derive_run_dir(cfg)
    if run_dir is None and not target.exists():
        print(f"learnforget: no trained run for this config ({target}): scoring the base model "
              f"{base_model_id(cfg)} alone")
        from learnforget.eval.base import evaluate_base

        return evaluate_base(cfg)
    return evaluate_run(target, cfg.eval, cfg.logger, Path(cfg.paths.cache_dir).expanduser())
