"""The eval stage: each checkpoint of a run -> target and forgetting scores, against the base
model's scores (computed once per model and eval settings, then cached).

    learnforget eval runs/default/<run name> eval=offline
    learnforget eval model=smollm2_135m method=lora data=stdlib_code eval=offline  # same run
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from learnforget.config import conf_dir
from learnforget.data.packing import build_data, pack_documents
from learnforget.data.sources import load_records
from learnforget.errors import ConfigError
from learnforget.eval.crossentropy import mean_cross_entropy
from learnforget.files import atomic_write_json, read_json, read_result
from learnforget.record import meta_info, package_versions

ROLES = ("target", "forgetting")


# ------------------------------------------------------------------ suite -> task specs

def resolve_data_path(value: str, cache_dir: Path, task: str) -> Path:
    """`asset:humaneval`, `asset:bigbench/<task>`, `asset:benchmarks/<set>` (hellaswag,
    arc_challenge, arc_easy, winogrande, piqa, gsm8k), `package:<file>` (the small data files
    shipped with the package for the built-in suites), or a path (relative: to the repository)."""
    from learnforget.assets import eval_data as assets_cache

    if value.startswith("package:"):
        return assets_cache.suite_file(value.removeprefix("package:"), task)
    if value.startswith("asset:"):
        name = value.removeprefix("asset:")
        if name == "humaneval":
            return assets_cache.humaneval_path(cache_dir, fetch=False)
        if name.startswith("bigbench/"):
            return assets_cache.bigbench_path(cache_dir, name.removeprefix("bigbench/"), fetch=False)
        if name.startswith("benchmarks/"):
            from learnforget.assets.benchmarks import benchmark_path

            return benchmark_path(cache_dir, name.removeprefix("benchmarks/"), fetch=False)
        raise ConfigError(f"eval task {task}: unknown asset {value!r} (expected asset:humaneval, "
                          "asset:bigbench/<task> or asset:benchmarks/<set>)")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = conf_dir().parent / path
    if not path.exists():
        raise ConfigError(f"eval task {task}: data file not found: {path}")
    return path


def task_specs(ev: DictConfig, cache_dir: Path) -> list:
    """The suite's tasks as task_specs.TaskSpecs. Keys of a task entry: name, kind, data,
    fewshot_data, num_fewshot, role, chance, limit (overrides the suite's), max_gen_toks; HumanEval
    sampling: samples, temperature, top_p, ks.
    Kind builtin (name = lm-eval's task name, no data) needs the Hugging Face hub: a ConfigError
    here, before any model work, where HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set."""
    from learnforget.eval.task_specs import (
        BUILTIN,
        BUILTIN_YAML,
        TaskSpec,
        chance_level,
        require_hub,
    )

    specs = []
    for t in ev.tasks:
        if t.get("role", "forgetting") not in ROLES:
            raise ConfigError(f"eval task {t.name}: role {t.role!r} is unknown (expected "
                              f"{' or '.join(ROLES)})")
        common = {"name": str(t.name), "kind": str(t.kind), "num_fewshot": t.get("num_fewshot"),
                  "role": str(t.get("role", "forgetting")), "chance": t.get("chance")}
        if t.kind == BUILTIN:
            if t.get("data") or t.get("fewshot_data"):
                raise ConfigError(f"eval task {t.name}: kind builtin reads lm-eval's own data "
                                  "from the Hugging Face hub; remove data/fewshot_data")
            if t.name not in BUILTIN_YAML:
                raise ConfigError(f"eval task {t.name}: kind builtin runs lm-eval's own task of "
                                  f"that name, one of {', '.join(BUILTIN_YAML)}")
            spec = TaskSpec(**common)
            require_hub(spec.name, suite=str(ev.name))
            spec.chance = chance_level(spec)
            specs.append(spec)
            continue
        data = resolve_data_path(str(t.data), cache_dir, t.name)
        few = t.get("fewshot_data")
        ks = t.get("ks")
        specs.append(TaskSpec(
            **common, data_file=data,
            fewshot_file=resolve_data_path(str(few), cache_dir, t.name) if few else None,
            samples=t.get("samples"), temperature=t.get("temperature"), top_p=t.get("top_p"),
            ks=[1] if ks is None else list(ks), max_gen_toks=t.get("max_gen_toks")))
    return specs


def task_subsets(ev: DictConfig, specs) -> dict[str, list[int]]:
    """{task name: document indices} for the tasks with a `subset: N` entry: N documents of
    the task's data file drawn with seed `ev.subset_seed` (learnforget.eval.paired.subset_indices),
    the same for the base model and every checkpoint. A subset as large as the file is the
    whole file (no entry)."""
    from learnforget.eval.paired import subset_indices
    from learnforget.eval.task_specs import read_records

    sizes = {str(t.name): t.get("subset") for t in ev.tasks if t.get("subset") is not None}
    out: dict[str, list[int]] = {}
    for spec in specs:
        size = sizes.get(spec.name)
        if size is None:
            continue
        if spec.data_file is None:
            raise ConfigError(f"eval task {spec.name}: subset needs a local data file "
                              "(kind builtin reads the hub's data: use eval.limit)")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"eval task {spec.name}: subset must be an integer >= 1, "
                              f"got {size!r}")
        n_docs = len(read_records(Path(spec.data_file), spec))
        idx = subset_indices(n_docs, size, int(ev.get("subset_seed", 0)))
        if idx is not None:
            out[spec.name] = idx
    return out


def _chance_of(spec) -> float | None:
    """Chance accuracy of a multiple-choice task, from its own data file."""
    if spec.chance is not None:
        return spec.chance
    fixed = {"hellaswag": 0.25, "winogrande": 0.5, "piqa": 0.5}
    if spec.kind in fixed:
        return fixed[spec.kind]
    if spec.kind in ("arc_challenge", "arc_easy", "mc_json"):
        inv = []
        for line in spec.data_file.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                choices = rec["choices"] if spec.kind == "mc_json" else rec["choices"]["text"]
                inv.append(1 / len(choices))
        return sum(inv) / len(inv) if inv else None
    return None


# ------------------------------------------------------------------ perplexity sets

def ppl_examples(p: DictConfig, run_cfg: DictConfig, tokenizer, seq_len: int, cache_dir: Path):
    """The blocks of one cross-entropy set: the run's held-out split, an asset or a file."""
    max_blocks = int(p.get("max_blocks", 32))
    if p.source == "run" and run_cfg.data.get("format", "memory") == "shards":
        from learnforget.data.shards import ShardCorpus, corpus_dir, heldout_blocks

        corpus = ShardCorpus(corpus_dir(cache_dir, run_cfg.data, run_cfg.model))
        blocks = heldout_blocks(corpus, int(run_cfg.train.seq_len))
        return blocks[:max_blocks], f"held-out shard of data={run_cfg.data.name}"
    if p.source == "run":
        data = build_data(run_cfg.data, tokenizer, run_cfg.train.seq_len, seed=run_cfg.seed,
                          cache_dir=cache_dir)
        return data.heldout[:max_blocks], f"held-out split of data={run_cfg.data.name}"
    if p.source == "asset":
        from learnforget.assets import eval_data as assets_cache

        if p.path != "shakespeare":
            raise ConfigError(f"eval ppl set {p.name}: unknown asset {p.path!r} (expected shakespeare)")
        docs = [f.read_text() for f in assets_cache.shakespeare_text(cache_dir, fetch=False)]
        source = "asset:shakespeare"
    elif p.source == "file":
        path = resolve_data_path(str(p.path), cache_dir, str(p.name))
        docs = load_records({"name": str(p.name), "regime": "cpt", "source": "local",
                             "path": str(path), "text_field": p.get("text_field", "text")})
        source = str(path)
    else:
        raise ConfigError(f"eval ppl set {p.name}: source {p.source!r} is unknown (expected "
                          "run, asset or file)")
    blocks, _ = pack_documents(list(docs), tokenizer, tokenizer.eos_token_id, seq_len)
    if not blocks:
        raise ConfigError(f"eval ppl set {p.name}: fewer than {seq_len} tokens in {source}")
    return blocks[:max_blocks], source


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
    (quantised) base, unmerged."""
    from transformers import AutoModelForCausalLM

    from learnforget.assets.models import load_model, torch_dtype

    manifest = read_json(ckpt / "manifest.json") if ckpt else None
    if manifest and manifest["format"] == "safetensors":
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch_dtype(run_cfg.model.dtype))
        model.to(device)
    else:
        base_method = run_cfg.method if run_cfg.method.name == "qlora" else OmegaConf.create(
            {"name": "full"})
        model, _, _ = load_model(run_cfg.model, base_method, cache_dir, device)
        if manifest and manifest["format"] == "bottleneck_adapter":
            from learnforget.methods.bottleneck import load_adapter

            model = load_adapter(model, ckpt)
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
    peft_cfg = getattr(model, "peft_config", {}).get("default") if hasattr(
        model, "peft_config") else None
    virtual = isinstance(model, StripVirtualTokens) or (
        peft_cfg is not None and getattr(peft_cfg, "num_virtual_tokens", None))
    if backend == "hf" or virtual:
        return HFLM
    from learnforget.eval.fast_lm import SharedContextLM

    return SharedContextLM


def score(model, tokenizer, run_cfg: DictConfig, ev: DictConfig, specs, include_path: Path,
          cache_dir: Path, drift_eval=None) -> dict[str, Any]:
    """All of a suite's numbers for one model: lm-eval tasks, cross-entropy sets, diversity,
    drift from the base model (with `drift_eval`, a learnforget.eval.drift.DriftEval)."""
    from learnforget.console import library_bars

    t0 = time.perf_counter()
    with library_bars():  # lm-eval's per-task bars and the drift bar: to the run's log file
        return {**_score(model, tokenizer, run_cfg, ev, specs, include_path, cache_dir,
                         drift_eval), "wall_time_s": time.perf_counter() - t0}


def _score(model, tokenizer, run_cfg: DictConfig, ev: DictConfig, specs, include_path: Path,
           cache_dir: Path, drift_eval=None) -> dict[str, Any]:
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
                                   else None, items=bool(ev.get("items", True))))
        for spec in specs:
            if tasks[spec.name].get("chance") is None and spec.data_file is not None:
                tasks[spec.name]["chance"] = _chance_of(spec)
    ppl = {}
    for p in ev.ppl:
        examples, source = ppl_examples(p, run_cfg, tokenizer, int(ev.seq_len), cache_dir)
        ce, n = mean_cross_entropy(model, examples, batch_size=int(ev.batch_size),
                                   pad_id=tokenizer.pad_token_id, device=model.device)
        ppl[str(p.name)] = {"ce": ce, "ppl": math.exp(ce), "n_tokens": n, "source": source,
                            "role": str(p.get("role", "forgetting"))}
    return {"tasks": tasks, "ppl": ppl,
            "diversity": diversity(model, tokenizer, ev.diversity, int(ev.seed)),
            "drift": drift_eval.score(model) if drift_eval is not None else {}}


# ------------------------------------------------------------------ summary rows

def summarize(scores: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """One row: target and forgetting scores (means of each task's primary metric), their
    change against base, chance-corrected forgetting, and each cross-entropy set."""
    row: dict[str, Any] = {}
    for role in ROLES:
        vals = [t["primary"] for t in scores["tasks"].values() if t["role"] == role]
        row[f"{role}_score"] = sum(vals) / len(vals) if vals else None
        corrected = [(t["primary"] - t["chance"]) / (1 - t["chance"])
                     for t in scores["tasks"].values()
                     if t["role"] == role and t.get("chance") not in (None, 1)]
        row[f"{role}_score_chance_corrected"] = (sum(corrected) / len(corrected)
                                                 if corrected else None)
        ces = [p["ce"] for p in scores["ppl"].values() if p["role"] == role]
        row[f"{role}_ce"] = sum(ces) / len(ces) if ces else None
    for name, t in scores["tasks"].items():
        row[f"task/{name}"] = t["primary"]
    for name, p in scores["ppl"].items():
        row[f"ce/{name}"] = p["ce"]
    if scores.get("diversity"):
        row["diversity_mean_unique"] = scores["diversity"]["mean_unique"]
    if base is not None:
        b = summarize(base, None)
        for key, value in list(row.items()):
            if value is not None and b.get(key) is not None:
                row[f"delta/{key}"] = value - b[key]
    if base is not None:
        row.update(paired_columns(scores, base))
    if scores.get("drift"):  # already a change against base: no delta/ columns
        from learnforget.eval.drift import summary_row

        row.update(summary_row(scores["drift"]))
    return row


PAIRED_MEASURES = ("acc", "ll_gold", "margin")


def paired_columns(scores: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Paired changes against the base on the same items (learnforget.eval.paired) for every task
    both have per-item results of: `paired/<task>/<measure>_delta` (+ `_lo`, `_hi`: 95%
    paired bootstrap interval) for acc, ll_gold and margin, `paired/<task>/right_to_wrong`,
    `wrong_to_right`, `mcnemar_p`, `n`; `mde/<task>/<measure>` (minimum detectable change at
    95% from the base's per-item spread); and the forgetting tasks pooled:
    `paired_forgetting_<measure>_delta` (+ `_lo`, `_hi`), `paired_forgetting_right_to_wrong`,
    `paired_forgetting_wrong_to_right`."""
    from learnforget.eval.paired import mde, paired_change, pooled_change

    row: dict[str, Any] = {}
    forgetting = []
    for name, t in scores["tasks"].items():
        b = base["tasks"].get(name) or {}
        if not t.get("items") or not b.get("items") or not t["items"]["doc_id"]:
            continue
        ch = paired_change(b["items"], t["items"], keep_boots=True)
        for key, value in ch.items():
            if key != "_boots":
                row[f"paired/{name}/{key}"] = value
        for key, value in mde(b["items"]).items():
            if key != "n":
                row[f"mde/{name}/{key}"] = value
        if t.get("role") == "forgetting":
            forgetting.append(ch)
    if forgetting:
        pooled = pooled_change(forgetting)
        for key, value in pooled.items():
            row[f"paired_forgetting_{key}"] = value
    return row


# ------------------------------------------------------------------ the stage

def eval_key(ev: DictConfig, specs, include_path: Path) -> str:
    """Hash of everything that defines the scores: the suite's settings and each task's
    config and data (so a changed task file invalidates cached results)."""
    from learnforget.eval.task_yaml import task_config_hash

    settings = OmegaConf.to_container(ev, resolve=True)
    for volatile in ("checkpoint", "after_train"):
        settings.pop(volatile, None)
    hashes = {s.name: task_config_hash(include_path, s.name) for s in specs}
    blob = json.dumps({"settings": settings, "tasks": hashes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def base_model_id(run_cfg: DictConfig) -> str:
    """The base model a run's checkpoints are scored against (QLoRA: its 4-bit base)."""
    model_id = run_cfg.model.name
    if run_cfg.method.name == "qlora":  # adapters are scored on the base they trained on
        m = run_cfg.method
        model_id += (f"-8bit-int8-{m.compute_dtype}" if m.quant_type == "int8" else
                     f"-4bit-{m.quant_type}{'-dq' if m.double_quant else ''}-{m.compute_dtype}")
    return model_id


def base_scores(run_cfg: DictConfig, ev: DictConfig, key: str, runs_root: Path, tokenizer,
                specs, include_path: Path, cache_dir: Path, device: str,
                drift_eval=None, model=None) -> dict[str, Any]:
    """The base model's scores, computed once per (model, quantisation, suite settings).
    `model`: the base model when the caller has it loaded already."""
    from learnforget.files import file_lock

    model_id = base_model_id(run_cfg)
    ppl_run = any(p.source == "run" for p in ev.ppl)
    data_id = f"-{run_cfg.data.name}" if ppl_run else ""
    path = runs_root / "_base" / model_id / f"{ev.name}{data_id}-{key[:12]}.json"
    with file_lock(path.with_suffix(".lock")):
        cached = read_result(path)
        if cached and cached.get("eval_key") == key:
            return {**cached, "cache_file": str(path)}
        print(f"learnforget: scoring the base model {model_id} on eval={ev.name} (cached after)")
        if model is None:
            model = (drift_eval.base_model if drift_eval is not None
                     else load_for_eval(run_cfg, None, cache_dir, device))
        result = {"eval_key": key, "model": model_id, "suite": ev.name,
                  **score(model, tokenizer, run_cfg, ev, specs, include_path, cache_dir,
                          drift_eval),
                  "versions": package_versions()}
        atomic_write_json(path, result)
        return {**result, "cache_file": str(path)}


def checked_specs(ev: DictConfig, cache_dir: Path) -> list:
    """The suite's task specs, after the code-execution opt-in check."""
    if ev.allow_code_execution is False and any(t.kind == "humaneval" for t in ev.tasks):
        from learnforget.eval.sandbox import require_opt_in

        require_opt_in(False)
    return task_specs(ev, cache_dir)


def drift_eval_for(ev: DictConfig, run_cfg: DictConfig, runs_root: Path, tokenizer, load_base):
    """A DriftEval when the suite measures drift (eval.drift.enabled), else None."""
    if ev.get("drift") is None or not ev.drift.get("enabled", False):
        return None
    from learnforget.eval.drift import DriftEval

    return DriftEval(ev.drift, model_id=base_model_id(run_cfg), runs_root=runs_root,
                     tokenizer=tokenizer, load_base=load_base)


def evaluate_run(run_dir: Path, ev: DictConfig, logger_cfg: DictConfig | None = None,
                 cache_dir: Path | None = None) -> Path:
    """Evaluate every checkpoint of a run folder (or ev.checkpoint); returns the summary path.
    What the libraries log goes to <run>/run.log (learnforget.console)."""
    from learnforget.console import LOG_NAME, library_output

    with library_output(Path(run_dir).resolve() / LOG_NAME, f"eval {ev.name}"):
        return _evaluate_run(run_dir, ev, logger_cfg, cache_dir)


def _evaluate_run(run_dir: Path, ev: DictConfig, logger_cfg: DictConfig | None,
                  cache_dir: Path | None) -> Path:
    from learnforget.assets.models import load_tokenizer
    from learnforget.eval.task_yaml import write_task_dir

    run_dir = Path(run_dir).resolve()
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml): train it first")
    run_cfg = OmegaConf.load(cfg_path)
    cache_dir = Path(cache_dir or run_cfg.paths.cache_dir).expanduser()
    ckpts = sorted((p for p in (run_dir / "checkpoints").glob("*") if (p / "manifest.json").exists()),
                   key=lambda p: read_json(p / "manifest.json")["step"]) \
        if (run_dir / "checkpoints").exists() else []
    if not ckpts:
        raise ConfigError(f"run folder {run_dir} has no checkpoints (train it first, or wait "
                          "for its first checkpoint)")
    if ev.checkpoint:
        ckpts = [p for p in ckpts if p.name == ev.checkpoint]
        if not ckpts:
            raise ConfigError(f"eval.checkpoint={ev.checkpoint!r} is not a checkpoint of "
                              f"{run_dir.name}")
    specs = checked_specs(ev, cache_dir)
    include_path = write_task_dir(specs, run_dir / "eval" / "tasks") if specs else run_dir
    key = eval_key(ev, specs, include_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(str(run_dir / "tokenizer"))
    drift_eval = drift_eval_for(ev, run_cfg, run_dir.parents[1], tokenizer,
                             lambda: load_for_eval(run_cfg, None, cache_dir, device))
    base = base_scores(run_cfg, ev, key, run_dir.parents[1], tokenizer, specs, include_path,
                       cache_dir, device, drift_eval)

    from learnforget.tracking import mirror_loggers

    loggers = mirror_loggers(logger_cfg, run_dir=run_dir, run_name=run_dir.name,
                             group=str(run_cfg.experiment_name), job_type="eval",
                             config={"eval": OmegaConf.to_container(ev, resolve=True)},
                             tags=[run_cfg.method.name, run_cfg.data.name, ev.name],
                             x_axis="tokens")
    rows = [{"checkpoint": "base", "step": 0, "tokens": 0, **summarize(base, base)}]
    for ckpt in tqdm(ckpts, desc=f"eval {run_dir.name[:30]}", disable=None):
        manifest = read_json(ckpt / "manifest.json")
        out = run_dir / "eval" / f"{ckpt.name}.json"
        result = read_result(out)
        if not (result and result.get("eval_key") == key):
            model = load_for_eval(run_cfg, ckpt, cache_dir, device)
            result = {"checkpoint": ckpt.name, "step": manifest["step"],
                      "tokens": manifest["tokens"], "epoch": manifest.get("epoch"),
                      "eval_key": key, "suite": ev.name, "batch_size": int(ev.batch_size),
                      "seed": int(ev.seed), "limit": ev.limit,
                      **score(model, tokenizer, run_cfg, ev, specs, include_path, cache_dir,
                              drift_eval),
                      "meta": meta_info()}
            atomic_write_json(out, result)
            del model
        row = {"checkpoint": ckpt.name, "step": result["step"], "tokens": result["tokens"],
               **summarize(result, base)}
        rows.append(row)
        loggers.log(row)
    summary = {"run": run_dir.name, "suite": ev.name, "eval_key": key,
               "base_scores": str(run_dir.parents[1] / "_base"), "rows": rows}
    path = run_dir / "eval" / f"summary-{ev.name}.json"
    atomic_write_json(path, summary)
    _write_csv(path.with_suffix(".csv"), rows)
    loggers.summary({"eval_suite": ev.name})
    loggers.finish("finished")
    print_rows(rows)
    return path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    from learnforget.files import atomic_write_text

    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def print_rows(rows: list[dict[str, Any]]) -> None:
    def f(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    cols = ["checkpoint", "tokens", "target_score", "forgetting_score", "target_ce",
            "forgetting_ce", "drift_kl"]
    print("  ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print("  ".join(f"{f(r.get(c)):>16}" for c in cols))
    for line in paired_lines(rows):
        print(line)


def paired_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per task: the base's minimum detectable change, then each checkpoint's paired change
    (acc, margin with 95% intervals; flips and McNemar's p)."""
    tasks = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("paired/")})
    out = []
    for task in tasks:
        base = rows[0]
        n = base.get(f"paired/{task}/n")
        mde_acc, mde_m = base.get(f"mde/{task}/acc"), base.get(f"mde/{task}/margin")
        head = f"{task}: n={n}, minimum detectable change at 95%: acc {mde_acc:.4f}" \
            if mde_acc is not None else f"{task}: n={n}"
        if mde_m is not None:
            head += f", margin {mde_m:.4f}"
        out.append(head)
        for r in rows[1:]:
            p = f"paired/{task}/"
            if r.get(p + "acc_delta") is None:
                continue
            line = (f"  {r['checkpoint']:>12}  d_acc {r[p + 'acc_delta']:+.4f} "
                    f"[{r[p + 'acc_delta_lo']:+.4f}, {r[p + 'acc_delta_hi']:+.4f}]  "
                    f"right->wrong {r[p + 'right_to_wrong']}  wrong->right "
                    f"{r[p + 'wrong_to_right']}  McNemar p {r[p + 'mcnemar_p']:.3f}")
            if r.get(p + "margin_delta") is not None:
                line += (f"  d_margin {r[p + 'margin_delta']:+.4f} "
                         f"[{r[p + 'margin_delta_lo']:+.4f}, {r[p + 'margin_delta_hi']:+.4f}]")
            out.append(line)
    return out


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
