"""Scoring one model on a suite: loading a checkpoint (or the base) for eval, lm-eval tasks,
cross-entropy sets, diversity, drift; the base model's scores, cached once per settings."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from learnforget.errors import ConfigError
from learnforget.eval.crossentropy import block_cross_entropy, mean_cross_entropy
from learnforget.eval.head import apply_head_policy, head_record
from learnforget.eval.suite import (
    _chance_of,
    ppl_examples,
    scoring_precision,
    task_subsets,
)
from learnforget.files import atomic_write_json, file_lock, read_json, read_result
from learnforget.methods.registry import method_of
from learnforget.runfolder import MANIFEST, base_dir, package_versions

# ------------------------------------------------------------------ models

class StripVirtualTokens(torch.nn.Module):
    """Prompt tuning prepends virtual tokens, and peft returns their logits too; lm-eval
    expects one logit row per input token, so drop the first `n` rows."""

    def __init__(self, model: torch.nn.Module, n: int):
        super().__init__()
        self.model, self.n = model, n

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        out.logits = out.logits[:, self.n:, :]
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def load_for_eval(run_cfg: DictConfig, ckpt: Path | None, cache_dir: Path, device: str):
    """The base model (ckpt None) or a checkpoint: adapters (peft or bottleneck) on their
    (quantised) base, unmerged. A run started from another run's weights (model.init_from)
    gets its adapters on those weights, as it trained (learnforget.train.init_from)."""
    from transformers import AutoModelForCausalLM

    from learnforget.assets.models import load_model, torch_dtype

    manifest = read_json(ckpt / MANIFEST) if ckpt else None
    if manifest and manifest["format"] == "safetensors":
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch_dtype(run_cfg.model.dtype))
        model.to(device)
    else:
        base_method = method_of(run_cfg.method).base_config(run_cfg.method)
        model, _, _ = load_model(run_cfg.model, base_method, cache_dir, device)
        if manifest:  # the adapter's base is the weights it trained on
            from learnforget.train.init_from import load_init

            load_init(model, run_cfg)
        if manifest and manifest["format"] == "bottleneck_adapter":
            from learnforget.methods.bottleneck.model import load_adapter

            model = load_adapter(model, ckpt)
        elif manifest and manifest["format"] == "said":
            from learnforget.methods.said.model import load_said

            model = load_said(model, ckpt)  # W0 + ΔW merged: a plain model
        elif manifest:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, ckpt)
            cfg = model.peft_config["default"]
            if type(cfg).__name__ == "PromptTuningConfig":
                model = StripVirtualTokens(model, cfg.num_virtual_tokens)
    model.eval()
    return model


@torch.no_grad()
def diversity(model, tokenizer, d: DictConfig, seed: int) -> dict[str, Any]:
    """Unique completions among `samples` sampled per prompt (paper fig. 5)."""
    if not d.prompts:
        return {}
    per_prompt = {}
    for i, prompt in enumerate(d.prompts):
        torch.manual_seed(seed + i)
        enc = tokenizer(prompt, return_tensors="pt").to(model.device)
        out = model.generate(**enc, do_sample=True, temperature=float(d.temperature),
                             top_p=float(d.top_p), max_new_tokens=int(d.max_new_tokens),
                             num_return_sequences=int(d.samples),
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        per_prompt[prompt] = len(set(texts))
    return {"samples": int(d.samples), "unique": per_prompt,
            "mean_unique": sum(per_prompt.values()) / len(per_prompt)}


def _logits_fp32(module, args, output):
    logits = getattr(output, "logits", None)
    if logits is not None and logits.is_floating_point() and logits.element_size() < 4:
        output.logits = output.logits.float()
    return output


def cast_for_scoring(model, ev: DictConfig):
    """The model in eval.precision's dtype (in place; `model`: unchanged). A cast model's
    logits come back in fp32, so every log-softmax (lm-eval, cross-entropy, drift) is fp32.
    Quantised (QLoRA) models keep their own compute dtype: only `model` applies."""
    dtype = {"model": None, "fp32": torch.float32, "bf16": torch.bfloat16}[scoring_precision(ev)]
    if dtype is None:
        return model
    if any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules()):
        raise ConfigError(f"eval.precision={ev.precision!r} cannot cast a quantised model "
                          "(QLoRA scores in its compute dtype): use eval.precision=model")
    # a model cast before may hold new parameters since (an adapter swapped in by
    # learnforget.eval.swap, created by peft in fp32): those are cast too, as a fresh load's
    if getattr(model, "_lf_scoring_dtype", None) != dtype or any(
            p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model.to(dtype)
        if getattr(model, "_lf_scoring_dtype", None) is None:
            model.register_forward_hook(_logits_fp32)
        model._lf_scoring_dtype = dtype
    return model


def prepare_for_scoring(model, ev: DictConfig):
    """The model as every scorer sees it (in place): eval.head's output layer (an fp32 copy
    taken from the weight as loaded: learnforget.eval.head), then eval.precision's dtype."""
    return cast_for_scoring(apply_head_policy(model, ev), ev)


def precision_record(model, ev: DictConfig) -> dict[str, str]:
    """What a result records of its scoring precision: the setting and the weights' dtype."""
    dtype = next(model.parameters()).dtype
    return {"setting": scoring_precision(ev), "dtype": str(dtype).removeprefix("torch.")}


BACKENDS = ("hf", "shared")


def lm_class(model, backend: str):
    """lm-eval's HFLM ("hf"), or learnforget.eval.fast_lm.SharedContextLM ("shared": a question's
    context once for all its choices; the same log-likelihoods within 1e-4). Prompt and prefix
    tuning put virtual tokens in front of every call, which a shared KV cache would repeat:
    those models always get HFLM."""
    from lm_eval.models.huggingface import HFLM

    if backend not in BACKENDS:
        raise ConfigError(f"eval.backend={backend!r} is unknown (expected one of: "
                          f"{', '.join(BACKENDS)})")
    peft_cfg = getattr(model, "active_peft_config", None) if hasattr(
        model, "peft_config") else None  # the active adapter's (learnforget.eval.swap names them)
    virtual = isinstance(model, StripVirtualTokens) or (
        peft_cfg is not None and getattr(peft_cfg, "num_virtual_tokens", None))
    if backend == "hf" or virtual:
        return HFLM
    from learnforget.eval.fast_lm import SharedContextLM

    return SharedContextLM


def score(model, tokenizer, run_cfg: DictConfig, ev: DictConfig, specs, include_path: Path,
          cache_dir: Path, drift_eval=None, task_cache: dict | None = None) -> dict[str, Any]:
    """All of a suite's numbers for one model, in eval.precision: lm-eval tasks, cross-entropy
    sets, diversity, drift from the base model (with `drift_eval`, a
    learnforget.eval.drift.DriftEval). `task_cache`: a dict kept across one stage's calls, so
    lm-eval's task objects are built once (learnforget.eval.lm_eval_run.evaluate)."""
    from learnforget.console import library_bars

    t0, c0 = time.perf_counter(), time.process_time()
    if drift_eval is not None:
        # the reference texts (a probe set shared by every precision and head) come from the
        # base model as loaded; its drift scoring is then in the suite's precision and head
        # like everything else
        _ = drift_eval.refs
        prepare_for_scoring(drift_eval.base_model, ev)
    model = prepare_for_scoring(model, ev)
    with library_bars():  # lm-eval's per-task bars and the drift bar: to the run's log file
        return {**_score(model, tokenizer, run_cfg, ev, specs, include_path, cache_dir,
                         drift_eval, task_cache), "precision": precision_record(model, ev),
                "head": head_record(model, ev), "wall_time_s": time.perf_counter() - t0,
                "cpu_time_s": time.process_time() - c0}


def _score(model, tokenizer, run_cfg: DictConfig, ev: DictConfig, specs, include_path: Path,
           cache_dir: Path, drift_eval=None, task_cache: dict | None = None) -> dict[str, Any]:
    from learnforget.eval.lm_eval_run import evaluate as run_tasks

    tasks: dict[str, Any] = {}
    if specs:
        os.environ["LEARNFORGET_CODE_EXEC_TIMEOUT_S"] = str(float(ev.code_timeout_s))
        lm = lm_class(model, str(ev.get("backend", "hf")))(
            pretrained=model, tokenizer=tokenizer, batch_size=int(ev.batch_size),
            max_gen_toks=int(ev.max_gen_toks))
        # a task entry's own `limit` overrides the suite's: one lm-eval call per distinct limit;
        # tasks with a fixed `subset` (lm-eval's samples=, no limit) go in one call of their own
        subsets = task_subsets(ev, specs)
        limits = {str(t.name): t.get("limit", ev.limit) for t in ev.tasks}
        groups: dict[Any, list] = {}
        for spec in specs:
            key = ("subset",) if spec.name in subsets else limits.get(spec.name, ev.limit)
            groups.setdefault(key, []).append(spec)
        for limit, group in groups.items():
            fixed = limit == ("subset",)
            tasks.update(run_tasks(lm, group, include_path, limit=None if fixed else limit,
                                   batch_size=int(ev.batch_size), seed=int(ev.seed),
                                   code_exec_allowed=bool(ev.allow_code_execution),
                                   samples={s.name: subsets[s.name] for s in group} if fixed
                                   else None, items=bool(ev.get("items", True)),
                                   task_cache=task_cache))
        for spec in specs:
            if tasks[spec.name].get("chance") is None and spec.data_file is not None:
                tasks[spec.name]["chance"] = _chance_of(spec)
    ppl = {}
    for p in ev.ppl:
        examples, source = ppl_examples(p, run_cfg, tokenizer, int(ev.seq_len), cache_dir)
        blocks: dict[str, Any] = {}
        if p.get("per_block", False):  # paired comparisons over blocks (learnforget.analysis.regime)
            ces, counts = block_cross_entropy(model, examples, pad_id=tokenizer.pad_token_id,
                                              device=model.device)
            n = sum(counts)
            ce = sum(c * k for c, k in zip(ces, counts, strict=True)) / n if n else math.nan
            blocks = {"blocks": ces, "block_tokens": counts}
        else:
            ce, n = mean_cross_entropy(model, examples, batch_size=int(ev.batch_size),
                                       pad_id=tokenizer.pad_token_id, device=model.device)
        ppl[str(p.name)] = {"ce": ce, "ppl": math.exp(ce), "n_tokens": n, "source": source,
                            "role": str(p.get("role", "forgetting")), **blocks}
    return {"tasks": tasks, "ppl": ppl,
            "diversity": diversity(model, tokenizer, ev.diversity, int(ev.seed)),
            "drift": drift_eval.score(model) if drift_eval is not None else {}}


def base_model_id(run_cfg: DictConfig) -> str:
    """The base model a run's checkpoints are scored against (QLoRA: its 4-bit base)."""
    model_id = run_cfg.model.name
    quant = method_of(run_cfg.method).quantisation(run_cfg.method)
    if quant is not None:  # adapters are scored on the base they trained on
        model_id += quant.base_suffix
    return model_id


def base_scores(run_cfg: DictConfig, ev: DictConfig, key: str, runs_root: Path, tokenizer,
                specs, include_path: Path, cache_dir: Path, device: str,
                drift_eval=None, model=None, task_cache: dict | None = None,
                load_base=None) -> dict[str, Any]:
    """The base model's scores, computed once per (model, quantisation, suite settings).
    `model`: the base model when the caller has it loaded already; `load_base`: a function
    giving it when needed (learnforget.eval.swap's shared base); `task_cache`: see score."""
    model_id = base_model_id(run_cfg)
    ppl_run = any(p.source == "run" for p in ev.ppl)
    data_id = f"-{run_cfg.data.name}" if ppl_run else ""
    path = base_dir(runs_root, model_id) / f"{ev.name}{data_id}-{key[:12]}.json"
    with file_lock(path.with_suffix(".lock")):
        cached = read_result(path)
        if cached and cached.get("eval_key") == key:
            return {**cached, "cache_file": str(path)}
        print(f"learnforget: scoring the base model {model_id} on eval={ev.name} (cached after)")
        if model is None:
            model = (drift_eval.base_model if drift_eval is not None
                     else load_base() if load_base is not None
                     else load_for_eval(run_cfg, None, cache_dir, device))
        result = {"eval_key": key, "model": model_id, "suite": ev.name,
                  **score(model, tokenizer, run_cfg, ev, specs, include_path, cache_dir,
                          drift_eval, task_cache),
                  "versions": package_versions()}
        atomic_write_json(path, result)
        return {**result, "cache_file": str(path)}


def drift_eval_for(ev: DictConfig, run_cfg: DictConfig, runs_root: Path, tokenizer, load_base):
    """A DriftEval when the suite measures drift (eval.drift.enabled), else None."""
    if ev.get("drift") is None or not ev.drift.get("enabled", False):
        return None
    from learnforget.eval.drift import DriftEval

    return DriftEval(ev.drift, model_id=base_model_id(run_cfg), runs_root=runs_root,
                     tokenizer=tokenizer, load_base=load_base)
