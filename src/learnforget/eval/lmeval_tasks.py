"""lm-eval (0.4.x) tasks on local files: built-in benchmarks reused verbatim, plus BIG-bench-style
multiple choice and HumanEval, evaluated offline; and lm-eval's built-in tasks themselves, on
their own data from the Hugging Face hub (kind "builtin").

`write_task_dir` writes one task YAML per `TaskSpec` into a folder that lm-eval indexes as its
only `include_path` (no default task indexing: ~0.01 s instead of ~12 s):

- hellaswag, arc_challenge, arc_easy, winogrande, piqa, gsm8k: the YAML `include:`s the installed
  built-in YAML
  by absolute path and overrides only the data source (`dataset_path: json`, `dataset_name:
  null`, `dataset_kwargs.data_files`, the split keys), `task`, `tag: []` and, where the spec asks,
  `num_fewshot` / `generation_kwargs.max_gen_toks`. Prompt, choices, targets, `process_docs`,
  filters and metrics stay the built-in task's own. Split names are the built-in ones
  (hellaswag: validation, arc_challenge/arc_easy: test, winogrande: validation, piqa:
  validation, gsm8k: test + train). `learnforget assets fetch benchmarks` provides the real sets
  in these schemas (learnforget.assets.benchmarks).
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
  problem the unbiased pass@k (`sandbox.pass_at_k(n, c, k)`, c passing of n); lm-eval's `mean`
  averages it over problems. Metrics `pass@1` (and `pass@k` for each k in `ks`).
- builtin: lm-eval's own task of that name (hellaswag, arc_challenge, arc_easy, winogrande, piqa,
  gsm8k) with
  its own data from the hub: the YAML `include:`s the installed built-in YAML by absolute path
  and sets only `task` (the same name), `tag: []` and the spec's `num_fewshot` /
  `max_gen_toks`, so the task folder stays the only include_path (no ~12 s default indexing)
  and `task_config_hash` covers the built-in YAML text (there is no data file to hash; the hub
  data enters only by the YAML's dataset_path/dataset_name). `evaluate` refuses, before any
  model work, when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set (`require_hub`).

Few-shot examples come from `fewshot_file` (split "train") when given, else from the evaluated
file itself, arranged so that lm-eval leaves the evaluated document out of its own context.

Result metric names: lm-eval reports `"<metric>,<filter>"`; `evaluate` returns clean keys:
`<metric>` for filter "none" (and "create_test", the sampled HumanEval's), `<metric>_strict` for
"strict-match", `<metric>_flexible` for "flexible-extract", else `<metric>_<filter>`
(non-alphanumerics → "_"). Primary metrics (kind builtin: by task name, the same):

    hellaswag      acc_norm            ("acc_norm,none")
    arc_challenge  acc_norm            ("acc_norm,none")
    arc_easy       acc_norm            ("acc_norm,none")
    piqa           acc_norm            ("acc_norm,none")
    winogrande     acc                 ("acc,none")
    mc_json        acc                 ("acc,none")
    gsm8k          exact_match_strict  ("exact_match,strict-match")
    humaneval      pass@1              ("pass@1,none"; sampled: "pass@1,create_test")

Chance levels (`chance_level`): hellaswag .25, winogrande and piqa .5, arc_* and mc_json the mean
of 1/len(choices) over the data file; builtin arc_challenge None (its 3-5 choices per question
are in the hub data, not known before evaluation; set `chance` to give one); generative None.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from learnforget.errors import ConfigError
from learnforget.eval.tasks import humaneval_utils
from learnforget.files import atomic_write_text

KINDS = ("hellaswag", "arc_challenge", "arc_easy", "winogrande", "piqa", "gsm8k", "humaneval",
         "mc_json")  # local data
BUILTIN = "builtin"  # lm-eval's own task of the spec's name, its data from the hub
ALL_KINDS = (*KINDS, BUILTIN)
ROLES = ("forgetting", "target")
GENERATIVE = ("gsm8k", "humaneval")

# Built-in YAML (relative to the installed lm_eval/tasks/) and the split the records are read as.
BUILTIN_YAML = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "winogrande": "winogrande/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",
}
EVAL_SPLIT = {
    "hellaswag": "validation",
    "arc_challenge": "test",
    "arc_easy": "test",
    "winogrande": "validation",
    "piqa": "validation",
    "gsm8k": "test",
    "humaneval": "test",
    "mc_json": "test",
}
FEWSHOT_SPLIT = "train"  # the split name a fewshot_file is loaded as
# Fields every record must have (what the task's prompt, choices, target and hooks read).
REQUIRED_FIELDS = {
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "arc_challenge": ("question", "choices", "answerKey"),
    "arc_easy": ("question", "choices", "answerKey"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "gsm8k": ("question", "answer"),
    "humaneval": ("task_id", "prompt", "test", "entry_point"),
    "mc_json": ("input", "choices", "gold"),
}
# lm-eval result key ("metric,filter") of each kind's primary metric, and our clean name for it.
LMEVAL_PRIMARY = {
    "hellaswag": "acc_norm,none",
    "arc_challenge": "acc_norm,none",
    "arc_easy": "acc_norm,none",
    "winogrande": "acc,none",
    "piqa": "acc_norm,none",
    "mc_json": "acc,none",
    "gsm8k": "exact_match,strict-match",
    "humaneval": "pass@1,none",
}
FILTER_SUFFIX = {"none": "", humaneval_utils.SAMPLED_FILTER: "", "strict-match": "_strict",
                 "flexible-extract": "_flexible"}
# Environment variables that keep `datasets` / `huggingface_hub` off the network, and the values
# they read as true (huggingface_hub.constants._is_true, datasets.config).
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}
# Stop sequences of lm-eval's humaneval.yaml (lm_eval/tasks/humaneval/humaneval.yaml).
HUMANEVAL_UNTIL = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
DEFAULT_BOOTSTRAP_ITERS = 100  # >0 so stderrs are reported; mean metrics use the closed form
HEADER = "# Written by learnforget.eval.lmeval_tasks.write_task_dir: regenerated on every write.\n"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class TaskSpec:
    name: str  # our task name, e.g. "lf_hellaswag" (unique per suite); builtin: lm-eval's name
    kind: str  # one of ALL_KINDS
    # local jsonl in the built-in task's own record format (mc_json: module doc); builtin: None
    data_file: Path | None = None
    fewshot_file: Path | None = None  # few-shot pool (split "train"); default: data_file itself
    num_fewshot: int | None = None  # None: the built-in task's default (hellaswag etc.: 0)
    role: str = "forgetting"  # "forgetting" | "target": passed through for the caller
    chance: float | None = None  # None: the kind's default (see chance_level)
    max_gen_toks: int | None = None  # generative kinds; None: the LM's (HFLM default 256)
    # humaneval sampling (the paper: 50, 0.2, 0.95); samples None: one greedy completion
    samples: int | None = None  # completions per problem (lm-eval `repeats`)
    temperature: float | None = None  # > 0, required with samples
    top_p: float | None = None  # in (0, 1]; None: 1.0
    ks: list[int] = field(default_factory=lambda: [1])  # pass@k reported, each k <= samples


def primary_metric(kind: str, name: str | None = None) -> str:
    """The clean result key of `kind`'s headline metric (mapping in the module docstring);
    kind "builtin" by lm-eval task `name`."""
    if kind == BUILTIN:
        _check_builtin_name(name, where="primary_metric")
        kind = str(name)
    _check_kind(kind, where="primary_metric")
    return clean_metric_key(LMEVAL_PRIMARY[kind])


def hub_offline() -> str | None:
    """The first of OFFLINE_ENV set to a true value, else None."""
    for key in OFFLINE_ENV:
        if os.environ.get(key, "").strip().upper() in _TRUE:
            return key
    return None


def require_hub(name: str, suite: str | None = None) -> None:
    """ConfigError when the Hugging Face hub cannot be reached (HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE set): builtin task `name` downloads its data from there."""
    if hub_offline() is None:
        return
    where = f"eval={suite} task {name}" if suite else f"task {name}"
    raise ConfigError(f"{where} needs the Hugging Face hub to download its data, which cannot be "
                      "reached here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set): use eval=offline")


def clean_metric_key(key: str) -> str:
    """lm-eval's "metric,filter" result key as a plain name: "exact_match,strict-match" →
    "exact_match_strict", "acc_norm,none" → "acc_norm"."""
    metric, _, filt = key.partition(",")
    if not filt:
        return metric
    suffix = FILTER_SUFFIX.get(filt)
    if suffix is None:
        suffix = "_" + re.sub(r"[^A-Za-z0-9]+", "_", filt).strip("_")
    return metric + suffix


def builtin_yaml(kind: str) -> Path:
    """The installed lm-eval YAML that `kind` reuses."""
    import lm_eval  # cheap: lm_eval.tasks itself would take ~1 s to import

    path = Path(lm_eval.__file__).resolve().parent / "tasks" / BUILTIN_YAML[kind]
    if not path.is_file():
        raise ConfigError(f"lm-eval {_lm_eval_version()} has no built-in task file {path} "
                          f"(needed for kind {kind!r})")
    return path


def chance_level(spec: TaskSpec) -> float | None:
    """spec.chance if set; else hellaswag .25, winogrande .5, arc_challenge and mc_json the mean
    of 1/len(choices) over the data file; generative kinds None. Builtin tasks by name the same,
    except arc_challenge: None (its data is on the hub)."""
    if spec.chance is not None:
        return float(spec.chance)
    if spec.kind == BUILTIN:
        return {"hellaswag": 0.25, "winogrande": 0.5, "piqa": 0.5}.get(spec.name)
    if spec.kind == "hellaswag":
        return 0.25
    if spec.kind in ("winogrande", "piqa"):
        return 0.5
    if spec.kind in ("arc_challenge", "arc_easy", "mc_json"):
        recs = _read_records(Path(spec.data_file), spec)
        sizes = [len(r["choices"] if spec.kind == "mc_json" else r["choices"]["text"])
                 for r in recs]
        return sum(1.0 / n for n in sizes) / len(sizes)
    return None


# ------------------------------------------------------------------------------ writing tasks


def write_task_dir(specs: list[TaskSpec], dest: Path) -> Path:
    """Write `<name>.yaml` for each spec into `dest` (created) and return `dest`, the
    include_path for `TaskManager(include_path=dest, include_defaults=False)`. YAMLs this
    function wrote earlier for tasks no longer in `specs` are removed; other files are left."""
    _validate_specs(specs)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = {f"{s.name}.yaml" for s in specs}
    for old in dest.glob("*.yaml"):
        if old.name not in names and old.read_text(errors="replace").startswith(HEADER):
            old.unlink()
    for spec in specs:
        _atomic_write(dest / f"{spec.name}.yaml", _task_yaml(spec))
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
        gen = dict(_load_yaml_plain(builtin_yaml("gsm8k")).get("generation_kwargs") or {})
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
        gen = dict(_load_yaml_plain(path).get("generation_kwargs") or {})
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


def _validate_specs(specs: list[TaskSpec]) -> None:
    if not specs:
        raise ConfigError("no evaluation tasks given")
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec.name, str) or not _NAME_RE.match(spec.name):
            raise ConfigError(f"task name {spec.name!r} is not valid (letters, digits, _ and -, "
                              "starting with a letter or digit)")
        if spec.name in seen:
            raise ConfigError(f"task name {spec.name!r} is used twice in one suite")
        seen.add(spec.name)
        _check_kind(spec.kind, where=f"task {spec.name!r}")
        if spec.kind == BUILTIN:
            _check_builtin_name(spec.name, where=f"task {spec.name!r}")
            if spec.data_file is not None or spec.fewshot_file is not None:
                raise ConfigError(f"task {spec.name!r}: kind builtin reads lm-eval's own data "
                                  "from the Hugging Face hub; give no data or few-shot file")
        elif spec.data_file is None:
            raise ConfigError(f"task {spec.name!r} ({spec.kind}): no data file given")
        _validate_sampling(spec)
        if spec.role not in ROLES:
            raise ConfigError(f"task {spec.name!r}: role {spec.role!r} is unknown "
                              f"(allowed roles: {', '.join(ROLES)})")
        if spec.num_fewshot is not None and (not isinstance(spec.num_fewshot, int)
                                             or spec.num_fewshot < 0):
            raise ConfigError(f"task {spec.name!r}: num_fewshot must be an integer >= 0, "
                              f"got {spec.num_fewshot!r}")
        if spec.kind == "humaneval" and spec.num_fewshot:
            raise ConfigError(f"task {spec.name!r}: humaneval is zero-shot "
                              f"(num_fewshot {spec.num_fewshot} given)")
        if spec.max_gen_toks is not None and (_base_kind(spec) not in GENERATIVE
                                              or not isinstance(spec.max_gen_toks, int)
                                              or spec.max_gen_toks < 1):
            raise ConfigError(f"task {spec.name!r}: max_gen_toks {spec.max_gen_toks!r} needs a "
                              f"generative kind ({', '.join(GENERATIVE)}) and an integer >= 1")
        if spec.chance is not None and not 0.0 <= float(spec.chance) <= 1.0:
            raise ConfigError(f"task {spec.name!r}: chance must be in [0, 1], got {spec.chance!r}")
        if spec.kind == BUILTIN:
            continue  # its data is on the hub: nothing to read here
        n_data = len(_read_records(Path(spec.data_file), spec))
        # lm-eval samples the shots at random from the pool (the data file minus the evaluated
        # document, or the few-shot file): too small a pool fails deep inside lm-eval.
        shots = spec.num_fewshot if spec.num_fewshot is not None else _default_shots(spec.kind)
        if spec.fewshot_file is not None:
            pool = len(_read_records(Path(spec.fewshot_file), spec, what="few-shot file"))
            source = f"few-shot file {spec.fewshot_file}"
        else:
            pool, source = n_data - 1, f"data file {spec.data_file} (less the evaluated item)"
        if shots > pool:
            raise ConfigError(f"task {spec.name!r}: {shots} few-shot examples need a pool of at "
                              f"least {shots}, but the {source} has {pool}")


def _validate_sampling(spec: TaskSpec) -> None:
    """samples / temperature / top_p / ks: humaneval only; temperature > 0 and 1 <= k <= n."""
    name = spec.name
    ks = spec.ks
    if ks is None or isinstance(ks, (str, int)) or not ks or any(
            isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ConfigError(f"task {name!r}: ks must be a non-empty list of integers >= 1, "
                          f"got {ks!r}")
    if spec.samples is None:
        if spec.temperature is not None or spec.top_p is not None or list(ks) != [1]:
            raise ConfigError(f"task {name!r}: temperature, top_p and ks apply to sampled "
                              "HumanEval only: give samples (completions per problem) too")
        return
    if spec.kind != "humaneval":
        raise ConfigError(f"task {name!r}: samples is for kind humaneval, not {spec.kind}")
    n = spec.samples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"task {name!r}: samples must be an integer >= 1, got {n!r}")
    t = spec.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ConfigError(f"task {name!r}: sampling {n} completions needs a temperature > 0, "
                          f"got {t!r}")
    p = spec.top_p
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                          or not 0 < p <= 1):
        raise ConfigError(f"task {name!r}: top_p must be in (0, 1], got {p!r}")
    if max(ks) > n:
        raise ConfigError(f"task {name!r}: pass@{max(ks)} needs at least {max(ks)} samples "
                          f"per problem, but samples is {n}")


def _base_kind(spec: TaskSpec) -> str:
    """The kind whose rules apply: a builtin task's name (hellaswag, ..., gsm8k), else kind."""
    return spec.name if spec.kind == BUILTIN else spec.kind


def _check_builtin_name(name: str | None, *, where: str) -> None:
    if name not in BUILTIN_YAML:
        raise ConfigError(f"{where}: kind builtin runs lm-eval's own task of the given name; "
                          f"{name!r} is not one of {', '.join(BUILTIN_YAML)}")


def _default_shots(kind: str) -> int:
    """num_fewshot when the spec leaves it open: the built-in YAML's, else 0 (as lm-eval)."""
    if kind not in BUILTIN_YAML:
        return 0
    return int(_load_yaml_plain(builtin_yaml(kind)).get("num_fewshot") or 0)


def _check_kind(kind: str, *, where: str) -> None:
    if kind not in ALL_KINDS:
        raise ConfigError(f"{where}: task kind {kind!r} is unknown "
                          f"(allowed kinds: {', '.join(ALL_KINDS)})")


def _read_records(path: Path, spec: TaskSpec, what: str = "data file") -> list[dict]:
    """The file's records (jsonl, or one JSON list), each checked for the kind's fields."""
    if not path.is_file():
        raise ConfigError(f"task {spec.name!r} ({spec.kind}): {what} {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            recs = json.loads(text)
        else:
            recs = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"task {spec.name!r}: {what} {path} is not JSON lines: {e}") from e
    if not recs:
        raise ConfigError(f"task {spec.name!r}: {what} {path} has no records")
    need = REQUIRED_FIELDS[spec.kind]
    for i, rec in enumerate(recs, 1):
        missing = [f for f in need if not isinstance(rec, dict) or f not in rec]
        if missing:
            raise ConfigError(f"task {spec.name!r} ({spec.kind}): record {i} of {what} {path} "
                              f"lacks field(s) {', '.join(missing)}")
    return recs


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text)


# ------------------------------------------------------------------------------ hashing


class _PlainLoader(yaml.SafeLoader):
    """Reads task YAMLs without importing anything: `!function x.y` becomes {"!function": ...}."""


_PlainLoader.add_constructor(
    "!function", lambda loader, node: {"!function": loader.construct_scalar(node)})


def _load_yaml_plain(path: Path) -> dict[str, Any]:
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_PlainLoader)  # noqa: S506
    if not isinstance(cfg, dict):
        raise ConfigError(f"task file {path} is not a YAML mapping")
    return cfg


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
    cfg = _load_yaml_plain(path)
    parts: dict[str, Any] = {"funcs": {}, "included": []}
    for ref in _function_refs(cfg):
        parts["funcs"][ref] = _sha(_function_source(ref, path.parent))
    inc = cfg.pop("include", None)
    while inc is not None:
        inc_path = Path(inc)
        text = inc_path.read_bytes()
        parts["included"].append(_sha(text))
        inc_cfg = _load_yaml_plain(inc_path)
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


# ------------------------------------------------------------------------------ evaluation


def _lm_eval_version() -> str:
    import lm_eval

    return getattr(lm_eval, "__version__", "unknown")


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@contextlib.contextmanager
def _lm_batch_size(lm: Any, batch_size: int | None) -> Iterator[None]:
    """lm-eval ignores simple_evaluate's batch_size for an already built LM: set the HFLM's."""
    if batch_size is None or not hasattr(lm, "batch_size_per_gpu"):
        yield
        return
    old = lm.batch_size_per_gpu
    lm.batch_size_per_gpu = int(batch_size)
    try:
        yield
    finally:
        lm.batch_size_per_gpu = old


@contextlib.contextmanager
def _no_env_info() -> Iterator[None]:
    """lm-eval adds torch's collect_env report to every result (about 5 s of subprocesses such
    as `pip list` per call); run.json's meta info already records the versions."""
    import lm_eval.evaluator as ev

    saved = ev.add_env_info
    ev.add_env_info = lambda results: None
    try:
        yield
    finally:
        ev.add_env_info = saved


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" where no stderr could be computed


def evaluate(
    lm: Any,
    specs: list[TaskSpec],
    include_path: Path,
    *,
    limit: int | None = None,
    batch_size: int | None = 8,
    seed: int = 1234,
    log_samples: bool = False,
    code_exec_allowed: bool = False,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    samples: dict[str, list[int]] | None = None,
    items: bool = False,
) -> dict[str, dict]:
    """Evaluate `lm` (an lm-eval LM, e.g. HFLM) on the tasks of `specs` written into
    `include_path` by write_task_dir, in one `lm_eval.simple_evaluate` call.

    Returns {task name: {"metrics", "stderr" (clean metric keys; stderr None where lm-eval has
    none), "n" (documents evaluated), "primary_metric", "primary", "chance", "role", "kind",
    "num_fewshot", "config_hash", "lm_eval_version"} (+ "samples" with log_samples)}.
    `samples` ({task name: document indices}, lm-eval's own `samples=`) scores fixed subsets
    (not together with `limit`); `items` adds "items", the per-item results from lm-eval's
    per-sample log (learnforget.eval.paired.item_records), and "subset" (the indices or None).
    `batch_size` (None: the LM's own) is set on the HFLM for the call. Running model-written
    code (humaneval) needs `code_exec_allowed=True`, and builtin tasks need the Hugging Face
    hub (`require_hub`); otherwise a ConfigError is raised before anything runs."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    _validate_specs(specs)
    for spec in specs:
        if spec.kind == BUILTIN:
            require_hub(spec.name)
    include_path = Path(include_path)
    for spec in specs:
        if not (include_path / f"{spec.name}.yaml").is_file():
            raise ConfigError(f"task {spec.name!r}: no task file in {include_path} "
                              "(write it with write_task_dir first)")
    if any(s.kind == "humaneval" for s in specs):
        from learnforget.eval.sandbox import require_opt_in

        require_opt_in(code_exec_allowed)
    hashes = {s.name: task_config_hash(include_path, s.name) for s in specs}
    tm = TaskManager(include_path=str(include_path), include_defaults=False)
    with _env(humaneval_utils.ENV_ALLOW, "1" if code_exec_allowed else "0"), \
            _lm_batch_size(lm, batch_size), _no_env_info():
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[s.name for s in specs],
            task_manager=tm,
            limit=limit,
            batch_size=batch_size,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples or items,
            confirm_run_unsafe_code=code_exec_allowed,
            samples=samples or None,
        )
    if out is None:  # non-zero rank of a distributed run
        return {}
    results = {s.name: _task_result(out, s, hashes[s.name], log_samples) for s in specs}
    if items:
        for s in specs:
            results[s.name]["items"] = _items(out, s)
            results[s.name]["subset"] = (samples or {}).get(s.name)
    return results


def _items(out: dict, spec: TaskSpec) -> dict[str, list]:
    """Per-item results of the primary metric (learnforget.eval.paired.item_records)."""
    from learnforget.eval.paired import item_records

    key = LMEVAL_PRIMARY[_base_kind(spec)]
    metric, _, filt = key.partition(",")
    logged = [x for x in out.get("samples", {}).get(spec.name, [])
              if x.get("filter") in (filt, humaneval_utils.SAMPLED_FILTER)]
    return item_records(logged, metric, normalised=metric == "acc_norm")


def _task_result(out: dict, spec: TaskSpec, config_hash: str, log_samples: bool) -> dict:
    raw = out["results"][spec.name]
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for key, value in raw.items():
        if "," not in key:  # "alias" and the like
            continue
        metric, _, filt = key.partition(",")
        if metric.endswith("_stderr"):
            stderr[clean_metric_key(f"{metric[: -len('_stderr')]},{filt}")] = _num(value)
        elif _num(value) is not None:
            metrics[clean_metric_key(key)] = float(value)
    n_samples = out.get("n-samples", {}).get(spec.name, {})
    n = n_samples.get("effective", n_samples.get("original"))
    primary = primary_metric(spec.kind, spec.name)
    res = {
        "metrics": metrics,
        "stderr": stderr,
        "n": None if n is None else int(n),
        "primary_metric": primary,
        "primary": metrics.get(primary),
        "chance": chance_level(spec),
        "role": spec.role,
        "kind": spec.kind,
        "num_fewshot": out.get("n-shot", {}).get(spec.name),
        "config_hash": config_hash,
        "lm_eval_version": _lm_eval_version(),
    }
    if log_samples:
        res["samples"] = out.get("samples", {}).get(spec.name, [])
    return res
