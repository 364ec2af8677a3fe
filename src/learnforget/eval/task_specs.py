"""What an lm-eval task of a suite is (`TaskSpec`), checked before any model work.

Kinds: hellaswag, arc_challenge, arc_easy, winogrande, piqa, gsm8k (lm-eval's built-in YAML on
local files), mc_json (multiple choice on ``{"input", "choices", "gold"}`` records), humaneval
(our sandbox as the metric) and builtin (lm-eval's own task on its hub data). Primary metrics
(kind builtin: by task name, the same):

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

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from learnforget.errors import ConfigError
from learnforget.eval.tasks import humaneval_utils

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
# The first line of generated task files. Clean-up (write_task_dir) removes the stale YAMLs that
# start with MARKER, also those written before the module was split (they name the old module);
# task_config_hash reads the parsed YAML, so this comment is not part of any task's hash.
HEADER = "# Written by learnforget.eval.task_yaml.write_task_dir: regenerated on every write.\n"
MARKER = "# Written by learnforget.eval."
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
    # sampled humaneval: keep the completions and count the unique ones among passing and
    # failing (learnforget.eval.diversity; paper fig. 5): "exact" strings or "stripped"
    diversity: str | None = None


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
        raise ConfigError(f"lm-eval {lm_eval_version()} has no built-in task file {path} "
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
        recs = read_records(Path(spec.data_file), spec)
        sizes = [len(r["choices"] if spec.kind == "mc_json" else r["choices"]["text"])
                 for r in recs]
        return sum(1.0 / n for n in sizes) / len(sizes)
    return None


def validate_specs(specs: list[TaskSpec]) -> None:
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
        if spec.max_gen_toks is not None and (base_kind(spec) not in GENERATIVE
                                              or not isinstance(spec.max_gen_toks, int)
                                              or spec.max_gen_toks < 1):
            raise ConfigError(f"task {spec.name!r}: max_gen_toks {spec.max_gen_toks!r} needs a "
                              f"generative kind ({', '.join(GENERATIVE)}) and an integer >= 1")
        if spec.chance is not None and not 0.0 <= float(spec.chance) <= 1.0:
            raise ConfigError(f"task {spec.name!r}: chance must be in [0, 1], got {spec.chance!r}")
        if spec.kind == BUILTIN:
            continue  # its data is on the hub: nothing to read here
        n_data = len(read_records(Path(spec.data_file), spec))
        # lm-eval samples the shots at random from the pool (the data file minus the evaluated
        # document, or the few-shot file): too small a pool fails deep inside lm-eval.
        shots = spec.num_fewshot if spec.num_fewshot is not None else _default_shots(spec.kind)
        if spec.fewshot_file is not None:
            pool = len(read_records(Path(spec.fewshot_file), spec, what="few-shot file"))
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
        _validate_diversity(spec)
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
    _validate_diversity(spec)


def _validate_diversity(spec: TaskSpec) -> None:
    """diversity: None, or one of learnforget.eval.diversity.MODES on a sampled humaneval task."""
    from learnforget.eval.diversity import MODES

    if spec.diversity is None:
        return
    if spec.samples is None or spec.kind != "humaneval":
        raise ConfigError(f"task {spec.name!r}: diversity={spec.diversity!r} needs a sampled "
                          "humaneval task (kind humaneval with samples)")
    if spec.diversity not in MODES:
        raise ConfigError(f"task {spec.name!r}: diversity={spec.diversity!r} is unknown "
                          f"(expected one of: {', '.join(MODES)})")


def base_kind(spec: TaskSpec) -> str:
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
    return int(load_yaml_plain(builtin_yaml(kind)).get("num_fewshot") or 0)


def _check_kind(kind: str, *, where: str) -> None:
    if kind not in ALL_KINDS:
        raise ConfigError(f"{where}: task kind {kind!r} is unknown "
                          f"(allowed kinds: {', '.join(ALL_KINDS)})")


def read_records(path: Path, spec: TaskSpec, what: str = "data file") -> list[dict]:
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


def lm_eval_version() -> str:
    import lm_eval

    return getattr(lm_eval, "__version__", "unknown")


class _PlainLoader(yaml.SafeLoader):
    """Reads task YAMLs without importing anything: `!function x.y` becomes {"!function": ...}."""


def load_yaml_plain(path: Path) -> dict[str, Any]:
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_PlainLoader)  # noqa: S506
    if not isinstance(cfg, dict):
        raise ConfigError(f"task file {path} is not a YAML mapping")
    return cfg


_PlainLoader.add_constructor(
    "!function", lambda loader, node: {"!function": loader.construct_scalar(node)})
