"""lm-eval (0.4.x) task YAMLs for `TaskSpec`s, and the hash of what a task's result depends on.

`write_task_dir` writes one task YAML per spec into a folder that lm-eval indexes as its only
`include_path` (no default task indexing: ~0.01 s instead of ~12 s):

- hellaswag, arc_challenge, arc_easy, winogrande, piqa, gsm8k: the YAML `include:`s the installed
  built-in YAML by absolute path and overrides only the data source (`dataset_path: json`,
  `dataset_name: null`, `dataset_kwargs.data_files`, the split keys), `task`, `tag: []` and,
  where the spec asks, `num_fewshot` / `generation_kwargs.max_gen_toks`. Prompt, choices,
  targets, `process_docs`, filters and metrics stay the built-in task's own. Split names are the
  built-in ones (hellaswag: validation, arc_challenge/arc_easy: test, winogrande: validation,
  piqa: validation, gsm8k: test + train). `learnforget assets fetch benchmarks` provides the real
  sets in these schemas (learnforget.assets.benchmarks).
- mc_json: a self-contained `multiple_choice` task on jsonl records
  `{"input": str, "choices": [str, ...], "gold": int}` (acc, acc_norm).
- humaneval: a self-contained `generate_until` task mirroring lm-eval's humaneval.yaml (prompt,
  stop sequences, greedy, `unsafe_code: true`) whose metric is our sandbox
  (`learnforget.eval.tasks.humaneval_utils.process_results`) instead of HF `evaluate`'s code_eval,
  which lm-eval's humaneval/utils.py loads from the hub at import time (so that YAML cannot be
  included offline).
  With `samples: n` it mirrors humaneval_64.yaml instead: `repeats: n` completions per problem
  sampled with `do_sample: true`, `temperature`, `top_p` (and `top_k: 0`, which switches off
  transformers' default top-k of 50: the protocol names temperature and top_p only), the
  filter "create_test" (lm-eval's name; `humaneval_utils.build_predictions`, prompt +
  completion) and the metric `humaneval_utils.pass_at_k` with `k: ks`, which reports per
  problem the unbiased pass@k (`humaneval.pass_at_k(n, c, k)`, c passing of n); lm-eval's `mean`
  averages it over problems. Metrics `pass@1` (and `pass@k` for each k in `ks`).
- builtin: lm-eval's own task of that name (hellaswag, arc_challenge, arc_easy, winogrande, piqa,
  gsm8k) with its own data from the hub: the YAML `include:`s the installed built-in YAML by
  absolute path and sets only `task` (the same name), `tag: []` and the spec's `num_fewshot` /
  `max_gen_toks`, so the task folder stays the only include_path (no ~12 s default indexing)
  and `task_config_hash` covers the built-in YAML text (there is no data file to hash; the hub
  data enters only by the YAML's dataset_path/dataset_name).

Few-shot examples come from `fewshot_file` (split "train") when given, else from the evaluated
file itself, arranged so that lm-eval leaves the evaluated document out of its own context.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from learnforget.errors import ConfigError
from learnforget.eval.task_specs import (
    BUILTIN,
    BUILTIN_YAML,
    EVAL_SPLIT,
    FEWSHOT_SPLIT,
    HEADER,
    HUMANEVAL_UNTIL,
    MARKER,
    TaskSpec,
    builtin_yaml,
    load_yaml_plain,
    validate_specs,
)
from learnforget.eval.tasks import humaneval_utils
from learnforget.files import atomic_write_text


def write_task_dir(specs: list[TaskSpec], dest: Path) -> Path:
    """Write `<name>.yaml` for each spec into `dest` (created) and return `dest`, the
    include_path for `TaskManager(include_path=dest, include_defaults=False)`. YAMLs this
    function wrote earlier for tasks no longer in `specs` are removed; other files are left."""
    validate_specs(specs)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = {f"{s.name}.yaml" for s in specs}
    for old in dest.glob("*.yaml"):
        if old.name not in names and old.read_text(errors="replace").startswith(MARKER):
            old.unlink()
    for spec in specs:
        atomic_write_text(dest / f"{spec.name}.yaml", _task_yaml(spec))
    return dest


def _task_yaml(spec: TaskSpec) -> str:
    if spec.kind == BUILTIN:
        return _builtin_task_yaml(spec)
    data = str(Path(spec.data_file).resolve())
    fewshot = None if spec.fewshot_file is None else str(Path(spec.fewshot_file).resolve())
    split = EVAL_SPLIT[spec.kind]
    data_files = {split: data}
    splits: dict[str, Any] = {"training_split": None, "validation_split": None, "test_split": None}
    splits[f"{'test' if split == 'test' else 'validation'}_split"] = split
    if fewshot is not None:
        data_files[FEWSHOT_SPLIT] = fewshot
        splits["training_split"] = FEWSHOT_SPLIT
        splits["fewshot_split"] = FEWSHOT_SPLIT
    else:
        # Few-shot pool = the evaluated split. lm-eval drops the document being evaluated from
        # its own context only when fewshot_split == test_split (lm_eval/api/task.py,
        # fewshot_context), hence "test" for test-split tasks and None (== test_split None)
        # for validation-split tasks, whose pool then falls back to the validation docs.
        splits["fewshot_split"] = split if split == "test" else None
    cfg: dict[str, Any] = {"task": spec.name}
    if spec.kind in BUILTIN_YAML:
        cfg = {"include": str(builtin_yaml(spec.kind)), "task": spec.name, "tag": []}
    cfg.update({"dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": data_files}, **splits})
    tail = ""
    if spec.kind == "mc_json":
        cfg.update({
            "output_type": "multiple_choice",
            "doc_to_text": "{{input}}",
            "doc_to_choice": "choices",  # a field name: the list itself, no template round trip
            "doc_to_target": "gold",  # a field name: the int index
            "target_delimiter": " ",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")],
            "metadata": {"version": 1.0},
        })
    elif spec.kind == "humaneval" and spec.samples is not None:
        cfg.update(_sampled_humaneval_cfg(spec))
    elif spec.kind == "humaneval":
        cfg.update({
            "unsafe_code": True,
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{test}}\ncheck({{entry_point}})",
            "metric_list": [{"metric": humaneval_utils.METRIC, "aggregation": "mean",
                             "higher_is_better": True}],
            "generation_kwargs": {
                "until": HUMANEVAL_UNTIL,
                "do_sample": False,
                # without max_gen_toks the LM's own applies (HFLM(max_gen_toks=...), 256)
                **({"max_gen_toks": spec.max_gen_toks} if spec.max_gen_toks else {}),
            },
            "repeats": 1,
            "num_fewshot": 0,
            "metadata": {"version": 1.0},
        })
        # A dotted module path: lm-eval imports it (the YAML's folder has no such file).
        tail = ("process_results: !function "
                f"{humaneval_utils.__name__}.{humaneval_utils.process_results.__name__}\n")
    elif spec.kind == "gsm8k" and spec.max_gen_toks is not None:
        gen = dict(load_yaml_plain(builtin_yaml("gsm8k")).get("generation_kwargs") or {})
        cfg["generation_kwargs"] = {**gen, "max_gen_toks": spec.max_gen_toks}
    if spec.num_fewshot is not None:
        cfg["num_fewshot"] = spec.num_fewshot
    return HEADER + yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                              width=1000) + tail


def _sampled_humaneval_cfg(spec: TaskSpec) -> dict[str, Any]:
    """humaneval_64.yaml's sampling setup with our sandbox filter and metric (module doc)."""
    mod = humaneval_utils.__name__
    return {
        "unsafe_code": True,
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{test}}\ncheck({{entry_point}})",
        "metric_list": [{"metric": _Function(f"{mod}.{humaneval_utils.pass_at_k.__name__}"),
                         "aggregation": "mean", "higher_is_better": True,
                         "k": sorted(set(spec.ks))}],
        "generation_kwargs": {
            "until": HUMANEVAL_UNTIL,
            "do_sample": True,
            "temperature": float(spec.temperature),
            "top_p": 1.0 if spec.top_p is None else float(spec.top_p),
            "top_k": 0,  # no top-k cut (transformers' default is 50)
            **({"max_gen_toks": spec.max_gen_toks} if spec.max_gen_toks else {}),
        },
        "repeats": int(spec.samples),
        "filter_list": [{"name": humaneval_utils.SAMPLED_FILTER, "filter": [
            {"function": "custom",
             "filter_fn": _Function(f"{mod}.{humaneval_utils.build_predictions.__name__}")}]}],
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }


def _builtin_task_yaml(spec: TaskSpec) -> str:
    """lm-eval's built-in task `spec.name`, unchanged but for the spec's settings."""
    path = builtin_yaml(spec.name)
    cfg: dict[str, Any] = {"include": str(path), "task": spec.name, "tag": []}
    if spec.num_fewshot is not None:
        cfg["num_fewshot"] = spec.num_fewshot
    if spec.max_gen_toks is not None:
        gen = dict(load_yaml_plain(path).get("generation_kwargs") or {})
        cfg["generation_kwargs"] = {**gen, "max_gen_toks": spec.max_gen_toks}
    return HEADER + yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                              width=1000)


class _Function(str):
    """A `!function module.name` reference in a written task YAML."""


class _Dumper(yaml.SafeDumper):
    """Strings with newlines in double quotes ("\\nclass"), readable in the written YAML."""


_Dumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style='"' if "\n" in s else None))
_Dumper.add_representer(_Function, lambda dumper, s: dumper.represent_scalar(
    "!function", str(s)))


def _function_refs(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        if set(obj) == {"!function"}:
            yield obj["!function"]
        for v in obj.values():
            yield from _function_refs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _function_refs(v)


def _function_source(ref: str, base_dir: Path) -> bytes:
    """The source of the module a `!function` reference names, found the way lm-eval does
    (a file next to the YAML first, then an importable module)."""
    mod = ref.rpartition(".")[0]
    local = base_dir / f"{mod.replace('.', '/')}.py"
    if local.is_file():
        return local.read_bytes()
    found = importlib.util.find_spec(mod)
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise ConfigError(f"function {ref!r} referenced in {base_dir} cannot be found")
    return Path(found.origin).read_bytes()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def task_config_hash(dest: Path, name: str) -> str:
    """sha256 over what defines task `name` in the include_path `dest`: its YAML, the text of
    every YAML it includes (the built-in chain), the source of every `!function` module they
    reference, and the bytes of its data files. Paths do not enter the hash (data files and
    included YAMLs enter by content), so it is the same on another machine or checkout."""
    path = Path(dest) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"task {name!r}: no task file {path} (write it with write_task_dir)")
    cfg = load_yaml_plain(path)
    parts: dict[str, Any] = {"funcs": {}, "included": []}
    for ref in _function_refs(cfg):
        parts["funcs"][ref] = _sha(_function_source(ref, path.parent))
    inc = cfg.pop("include", None)
    while inc is not None:
        inc_path = Path(inc)
        text = inc_path.read_bytes()
        parts["included"].append(_sha(text))
        inc_cfg = load_yaml_plain(inc_path)
        for ref in _function_refs(inc_cfg):
            parts["funcs"][f"{len(parts['included'])}:{ref}"] = _sha(
                _function_source(ref, inc_path.parent))
        nxt = inc_cfg.get("include")
        inc = None if nxt is None else (nxt if Path(nxt).is_absolute()
                                         else str(inc_path.parent / nxt))
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    hashed = {}
    for split, file in sorted(files.items()):
        if not Path(file).is_file():
            raise ConfigError(f"task {name!r}: data file {file} (split {split}) does not exist")
        hashed[split] = _sha(Path(file).read_bytes())
    cfg["dataset_kwargs"] = {**(cfg.get("dataset_kwargs") or {}), "data_files": hashed}
    parts["task"] = cfg
    return _sha(json.dumps(parts, sort_keys=True, default=str).encode())
