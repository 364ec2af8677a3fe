"""An eval suite resolved: its tasks as lm-eval task specs (data files, subsets, chance levels),
its cross-entropy sets, and the key that hashes everything defining its scores."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from learnforget.config import conf_dir
from learnforget.data.packing import build_data, pack_documents
from learnforget.data.sources import load_records
from learnforget.errors import ConfigError
from learnforget.methods.registry import quantised_base

ROLES = ("target", "forgetting")
PRECISIONS = ("model", "fp32", "bf16")


def scoring_precision(ev: DictConfig) -> str:
    """eval.precision, checked: `model` (the dtype the model is loaded in, run_cfg.model.dtype;
    the default), `fp32` or `bf16` (the weights cast to it for scoring, logits to fp32)."""
    value = str(ev.get("precision", "model"))
    if value not in PRECISIONS:
        raise ConfigError(f"eval.precision={value!r} is unknown (expected one of: "
                          f"{', '.join(PRECISIONS)})")
    return value


HEADS = ("fp32", "model")


def head_policy(ev: DictConfig) -> str:
    """eval.head, checked: `fp32` (the default: learnforget.eval.head.Fp32Head) or `model` (the
    LM head in the body's dtype, the behaviour before 2026-12-07)."""
    value = str(ev.get("head", "fp32"))
    if value not in HEADS:
        raise ConfigError(f"eval.head={value!r} is unknown (expected one of: {', '.join(HEADS)})")
    return value


def body_dtype(ev: DictConfig, run_cfg: DictConfig) -> str:
    """The dtype the model's body computes in when scored: eval.precision's (fp32, bf16), or
    with `model` the dtype it is loaded in (QLoRA: its compute dtype, which its unquantised
    layers, the head included, are loaded in)."""
    precision = scoring_precision(ev)
    if precision != "model":
        return {"fp32": "float32", "bf16": "bfloat16"}[precision]
    if quantised_base(run_cfg.method):
        return str(run_cfg.method.compute_dtype).removeprefix("torch.")
    return str(run_cfg.model.dtype).removeprefix("torch.")


def head_in_key(ev: DictConfig, dtype: str) -> bool:
    """Whether eval.head changes scores, and so belongs in the eval key: an fp32 head on a body
    that does not compute in fp32. An fp32 body's head already is fp32 (its results and cached
    files stay valid), and `model` is the behaviour the older keys describe."""
    return head_policy(ev) == "fp32" and dtype not in ("float32", "fp32")


def head_note(ev: DictConfig, run_cfg: DictConfig) -> str | None:
    """One line for the user where eval.head changes scores (learnforget.eval.head), else None."""
    dtype = body_dtype(ev, run_cfg)
    if not head_in_key(ev, dtype):
        return None
    return (f"eval.head=fp32: log-likelihoods through an fp32 LM head and log-softmax on a "
            f"{dtype} body, for the base and every checkpoint (scores before 2026-12-07 used a "
            f"{dtype} head: eval.head=model)")


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
    sampling: samples, temperature, top_p, ks, diversity.
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
            ks=[1] if ks is None else list(ks), max_gen_toks=t.get("max_gen_toks"),
            diversity=t.get("diversity")))
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


def eval_key(ev: DictConfig, specs, include_path: Path, *, body_dtype: str) -> str:
    """Hash of everything that defines the scores: the suite's settings and each task's
    config and data (so a changed task file invalidates cached results). eval.precision
    `model` (the default) is left out, so suites from before the setting keep their keys.
    eval.head is in only where it changes scores (`head_in_key`: an fp32 head on a body that
    computes in `body_dtype`, not fp32), so fp32 results keep their keys and files."""
    from learnforget.eval.task_yaml import task_config_hash

    settings = OmegaConf.to_container(ev, resolve=True)
    for volatile in ("checkpoint", "after_train", "swap_adapters"):  # same scores either way
        settings.pop(volatile, None)
    if settings.get("precision", "model") == "model":
        settings.pop("precision", None)
    settings.pop("head", None)
    if head_in_key(ev, body_dtype):
        settings["head"] = "fp32"
    hashes = {s.name: task_config_hash(include_path, s.name) for s in specs}
    blob = json.dumps({"settings": settings, "tasks": hashes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def checked_specs(ev: DictConfig, cache_dir: Path) -> list:
    """The suite's task specs, after the code-execution opt-in check (and eval.precision's
    and eval.head's)."""
    scoring_precision(ev)
    head_policy(ev)
    if ev.allow_code_execution is False and any(t.kind == "humaneval" for t in ev.tasks):
        from learnforget.eval.sandbox import require_opt_in

        require_opt_in(False)
    return task_specs(ev, cache_dir)
