"""Studies: a grid of runs from one file in `sweeps/`, listed, costed and launched as one Hydra
multirun whose task is `learnforget.studies.job.run_job` (train -> eval -> spectra per run).

    learnforget sweep code_ift --dry-run             # every job, its state and the GPU-hours
    learnforget sweep demo_tiny                      # run what is not done yet (the tiny CPU demo)
    learnforget sweep code_cpt --launcher submitit_slurm [--cluster FILE]
    learnforget sweep demo_tiny seed=0,1 train.lr=1e-3    # a,b adds a sweep axis; a value fixes one

A study file (YAML) holds:

    description: what the study is for (printed by the dry run)
    experiment_name: runs/<experiment_name>/... (default: the file's name)
    holds: [key=value, ...]           fixed for every job (Hydra overrides; or a mapping)
    sweep: {key: [v1, v2] | "v1,v2"}  the grid: the product of every axis (Hydra multirun syntax)
    rules: [{match: {key: value}, set: {key: value}}]   per-combination settings (e.g. the LR
                                      of each rank); a string value in sweep syntax ("a,b")
                                      expands the combination into one job per value
    grid: [{key: value, ...}, ...]    explicit settings whose values go together (e.g. targets
                                      with the rank that keeps the parameter budget), crossed
                                      with the `sweep` axes; a value is one value (a list is a
                                      list), a string in sweep syntax ("a,b") expands
    exclude: [{key: value}, ...]      combinations to drop (a list value matches any of it)
    stages: [train, eval, spectra]    what each job runs (default: the config's `stages`)
    gpu_hours_per_job: 12.5 | "<expression>"  cost estimate; names: tokens, epochs, checkpoints,
                                      method, r, lr, seq_len, batch, model, data, + estimate_vars
    estimate_vars: {name: number}
    launcher: basic | submitit_local | submitit_slurm | a conf/hydra/launcher/ name  (default
                                      basic; --launcher overrides)
    analyze: true                     run `learnforget analyze` on the study's runs at the end
    notes: [...]                      deviations from the paper and choices, printed by the dry run
    sizes: {toy: {overrides: [...], launcher: ..., gpu_hours_per_job: ...}}   named override
                                      sets (`--size toy`): applied like command-line overrides
                                      (before them), runs under <experiment_name>_<size>

Jobs that compose to the same run folder (e.g. `full` with every rank: it ignores method.r)
are one job. Each job's state: done (every stage complete), running (its lock is held),
resume (a resume state or finished earlier stages), new. Only resume and new jobs launch.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import itertools
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from learnforget.config import compose, conf_dir, run_dir, validate
from learnforget.errors import ConfigError
from learnforget.studies.job import job_state, run_job

STUDY_KEYS = ("description", "experiment_name", "holds", "sweep", "grid", "rules", "exclude",
              "stages", "gpu_hours_per_job", "estimate_vars", "launcher", "analyze", "notes",
              "sizes", "cluster", "global_batch")
SIZE_KEYS = ("overrides", "launcher", "gpu_hours_per_job", "experiment_name", "analyze")
LAUNCHERS = ("basic", "submitit_local", "submitit_slurm")  # + any conf/hydra/launcher/*.yaml
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit_local kills a job after timeout_min (default 60)
SWEEPER_NAME = "learnforget_jobs"
SLURM_NODE_NAME = "learnforget_slurm"
_PENDING: list[list[str]] = []     # the job list the sweeper hands to the launcher
_RESULTS: list[Any] = []           # the launcher's JobReturns, for the summary
_REFUSED: list[str] = []           # sbatch's words when SLURM refused the submission


# ============================================================================ study files

def studies_dir() -> Path:
    env = os.environ.get("LEARNFORGET_SWEEPS_DIR")
    return Path(env) if env else conf_dir().parent / "sweeps"


def available_launchers() -> list[str]:
    """The built-in choices, then launcher configs of this repository (conf/hydra/launcher/),
    which are passed to Hydra as they are (hydra/launcher=<name>)."""
    d = conf_dir() / "hydra" / "launcher"
    extra = sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []
    return list(LAUNCHERS) + [e for e in extra if e not in LAUNCHERS]


def available_studies() -> list[str]:
    d = studies_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def find_study(name: str) -> Path:
    """A path to a .yaml file, or the name of a file in sweeps/."""
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    p = studies_dir() / f"{name}.yaml"
    if p.exists():
        return p
    raise ConfigError(f"unknown study {name!r} (expected one of: "
                      f"{', '.join(available_studies()) or '(none)'}, or a path to a .yaml file)")


@dataclass
class Study:
    name: str
    path: Path
    description: str
    experiment_name: str
    holds: list[str]
    sweep: dict[str, list[str]]
    rules: list[dict[str, Any]]
    exclude: list[dict[str, Any]]
    stages: list[str] | None
    gpu_hours: float | str | None
    estimate_vars: dict[str, float]
    launcher: str
    analyze: bool
    notes: list[str]
    grid: list[list[tuple[str, str]]] = field(default_factory=list)  # each: [(key, override)]
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)
    size: str | None = None            # the size in use (apply_size)
    cluster: str | None = None         # the cluster profile its jobs need (conf/cluster/NAME)
    global_batch: int | None = None    # sequences per optimizer step, over all ranks


def fmt(value: Any) -> str:
    """A YAML value as the value part of a Hydra override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def split_override(text: str) -> tuple[str, str]:
    """'+train.lr=1e-4' -> ('train.lr', '1e-4'); the key without +, ++ or ~."""
    if "=" not in text:
        if text.startswith("~"):
            return text[1:], ""
        raise ConfigError(f"{text!r} is not an override (expected key=value)")
    key, value = text.split("=", 1)
    return key.lstrip("+~"), value


def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def sweep_values(key: str, spec: Any, where: str) -> list[str]:
    """The values of one sweep axis: a YAML list, or a string in Hydra multirun syntax."""
    if isinstance(spec, list):
        values = [fmt(v) for v in spec]
    elif isinstance(spec, str):
        try:
            o = _parser().parse_override(f"{key}={spec}")
        except Exception as e:  # hydra's grammar errors
            raise ConfigError(f"{where}: cannot parse {key}={spec}: {str(e).splitlines()[0]}") from e
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise ConfigError(f"{where}: {key}={spec} is not a list of values (interval "
                                  "sweeps cannot be enumerated)")
            values = list(o.sweep_string_iterator())
        else:
            values = [o.get_value_element_as_str()]
    else:
        values = [fmt(spec)]
    if not values:
        raise ConfigError(f"{where}: {key} has no values")
    return values


def _is_sweep(text: str) -> bool:
    try:
        return _parser().parse_override(text).is_sweep_override()
    except Exception:
        return False


def _override_list(value: Any, what: str) -> list[str]:
    """A study's list of key=value overrides, also accepted as a mapping."""
    value = value or []
    if isinstance(value, dict):
        value = [f"{k}={fmt(v)}" for k, v in value.items()]
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise ConfigError(f"{what} must be a list of key=value overrides or a mapping")
    return value


def load_study(path: Path) -> Study:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"study {path}: not valid YAML: {str(e).splitlines()[0]}") from e
    where = f"study {path.stem}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(STUDY_KEYS)}")
    unknown = [k for k in raw if k not in STUDY_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (expected: {', '.join(STUDY_KEYS)})")
    if not raw.get("description"):
        raise ConfigError(f"{where}: a study needs a `description`")
    holds = _override_list(raw.get("holds"), f"{where}: holds")
    for h in holds:
        split_override(h)
        if _is_sweep(h):
            raise ConfigError(f"{where}: holds fixes one value per key; {h!r} sweeps (move it "
                              "under `sweep`)")
    grid = raw.get("sweep") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: sweep must map a key to its values")
    sweep = {str(k): sweep_values(str(k), v, where) for k, v in grid.items()}
    settings = parse_grid(raw.get("grid"), set(sweep), where)
    sizes = raw.get("sizes") or {}
    if not isinstance(sizes, dict):
        raise ConfigError(f"{where}: sizes must map a name to {{overrides: [...], ...}} or a list")
    sizes = {str(k): parse_size(str(k), v, where) for k, v in sizes.items()}
    rules = raw.get("rules") or []
    for i, r in enumerate(rules):
        if not (isinstance(r, dict) and set(r) <= {"match", "set"} and isinstance(r.get("set"), dict)
                and isinstance(r.get("match", {}), dict)):
            raise ConfigError(f"{where}: rules[{i}] must be {{match: {{key: value}}, "
                              "set: {key: value}}")
    exclude = raw.get("exclude") or []
    if not all(isinstance(e, dict) for e in exclude):
        raise ConfigError(f"{where}: exclude must be a list of {{key: value}} mappings")
    stages = raw.get("stages")
    if stages is not None and not (isinstance(stages, list) and stages):
        raise ConfigError(f"{where}: stages must be a non-empty list")
    gpu = raw.get("gpu_hours_per_job")
    if gpu is not None and not isinstance(gpu, (int, float, str)):
        raise ConfigError(f"{where}: gpu_hours_per_job must be a number or an expression")
    evars = raw.get("estimate_vars") or {}
    if not isinstance(evars, dict):
        raise ConfigError(f"{where}: estimate_vars must be a mapping")
    launcher = raw.get("launcher", "basic")
    if launcher not in available_launchers():
        raise ConfigError(f"{where}: launcher {launcher!r} is unknown (expected one of: "
                          f"{', '.join(available_launchers())})")
    notes = raw.get("notes") or []
    notes = [notes] if isinstance(notes, str) else [str(n) for n in notes]
    gb = raw.get("global_batch")
    if gb is not None and not (isinstance(gb, int) and gb > 0):
        raise ConfigError(f"{where}: global_batch must be a positive integer, got {gb!r}")
    return Study(path.stem, path, " ".join(str(raw["description"]).split()),
                 str(raw.get("experiment_name") or path.stem), list(holds), sweep, rules,
                 exclude, stages, gpu, {str(k): v for k, v in evars.items()}, launcher,
                 bool(raw.get("analyze", False)), notes, settings, sizes,
                 cluster=raw.get("cluster"), global_batch=gb)


def parse_grid(raw: Any, axes: set[str], where: str) -> list[list[tuple[str, str]]]:
    """`grid:` -> one [(key, override), ...] per setting. A list value is one value (e.g.
    method.targets: [q_proj, v_proj]); a string in sweep syntax ("a,b") expands the setting."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw or not all(isinstance(e, dict) and e for e in raw):
        raise ConfigError(f"{where}: grid must be a non-empty list of {{key: value, ...}} "
                          "settings")
    out: list[list[tuple[str, str]]] = []
    for i, entry in enumerate(raw):
        both = sorted(set(map(str, entry)) & axes)
        if both:
            raise ConfigError(f"{where}: grid[{i}] sets {both}, which `sweep` also sweeps (a key "
                              "belongs to the grid or to an axis)")
        options: list[list[tuple[str, str]]] = [[]]
        for k, v in entry.items():
            vs = sweep_values(str(k), v, f"{where}: grid[{i}]") if isinstance(v, str) else [fmt(v)]
            options = [o + [(str(k), f"{k}={x}")] for o in options for x in vs]
        out.extend(options)
    return out


def parse_size(name: str, raw: Any, where: str) -> dict[str, Any]:
    """One entry of `sizes:`: a list of overrides, or {overrides, launcher, gpu_hours_per_job,
    experiment_name, analyze}."""
    spec = {"overrides": raw} if isinstance(raw, list) else raw
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: sizes.{name} must be a list of overrides or a mapping of "
                          f"{', '.join(SIZE_KEYS)}")
    unknown = [k for k in spec if k not in SIZE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: sizes.{name}: unknown key(s) {unknown} (expected: "
                          f"{', '.join(SIZE_KEYS)})")
    overrides = _override_list(spec.get("overrides"), f"{where}: sizes.{name}.overrides")
    for o in overrides:
        split_override(o)
    launcher = spec.get("launcher")
    if launcher is not None and launcher not in available_launchers():
        raise ConfigError(f"{where}: sizes.{name}.launcher {launcher!r} is unknown (expected one "
                          f"of: {', '.join(available_launchers())})")
    gpu = spec.get("gpu_hours_per_job")
    if gpu is not None and not isinstance(gpu, (int, float, str)):
        raise ConfigError(f"{where}: sizes.{name}.gpu_hours_per_job must be a number or an "
                          "expression")
    return {**spec, "overrides": list(overrides)}


def apply_size(study: Study, size: str | None, extra: Sequence[str] = ()) -> tuple[Study, list[str]]:
    """The study at a named size (`--size`): its overrides go before the command line's, its
    launcher and cost replace the study's, and its runs go under <experiment_name>_<size>."""
    if size is None:
        return study, list(extra)
    if size not in study.sizes:
        raise ConfigError(f"study {study.name} has no size {size!r} (its sizes: "
                          f"{', '.join(study.sizes) or '(none)'})")
    spec = study.sizes[size]
    changed = dataclasses.replace(
        study, size=size,
        experiment_name=str(spec.get("experiment_name") or f"{study.experiment_name}_{size}"),
        launcher=spec.get("launcher") or study.launcher,
        gpu_hours=spec.get("gpu_hours_per_job", study.gpu_hours),
        analyze=bool(spec.get("analyze", study.analyze)))
    return changed, list(spec["overrides"]) + list(extra)


# ============================================================================ expansion

def _same(a: Any, b: Any) -> bool:
    a, b = fmt(a) if not isinstance(a, str) else a, fmt(b) if not isinstance(b, str) else b
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    except ValueError:
        return False


def matches(values: dict[str, str], pattern: dict[str, Any]) -> bool:
    for key, want in pattern.items():
        have = values.get(str(key))
        options = want if isinstance(want, list) else [want]
        if have is None or not any(_same(have, w) for w in options):
            return False
    return True


@dataclass
class Job:
    index: int
    overrides: list[str]               # everything, in order: what the job composes from
    params: list[str]                  # the part that varies between jobs (for the listing)
    cfg: DictConfig
    run_dir: Path
    state: str = "new"
    next_stage: str | None = None
    gpu_hours: float | None = None
    duplicates: list[list[str]] = field(default_factory=list)


@dataclass
class Plan:
    study: Study
    jobs: list[Job]
    combinations: int
    excluded: int
    extra_fixed: list[str]
    hydra_overrides: list[str]


def _ordered(entries: Sequence[tuple[str, str]]) -> dict[str, str]:
    """key -> full override text; a later entry replaces an earlier one in place."""
    out: dict[str, str] = {}
    for key, text in entries:
        out[key] = text
    return out


def expand(study: Study, extra: Sequence[str] = ()) -> Plan:
    """Every job of the study (composed and validated), deduplicated by run folder."""
    axes = dict(study.sweep)
    fixed: list[str] = []
    hydra_args: list[str] = []
    for text in extra:
        key, value = split_override(text)
        if key.startswith(("hydra.", "hydra/")):
            hydra_args.append(text)
        elif _is_sweep(text):
            axes[key] = sweep_values(key, value, "command line")
        elif key in axes and not text.startswith(("+", "~")):
            axes[key] = [value]
        else:
            fixed.append(text)
    base = [f"experiment_name={study.experiment_name}"]
    if study.stages is not None:
        base.append(f"stages={fmt(study.stages)}")
    base += study.holds
    keys = list(axes)
    composer = Composer()
    jobs: list[Job] = []
    by_dir: dict[Path, Job] = {}
    combos = excluded = 0
    settings = study.grid or [[]]
    for setting, combo in itertools.product(settings,
                                            itertools.product(*(axes[k] for k in keys))):
        combos += 1
        swept = list(setting) + [(k, f"{k}={v}") for k, v in zip(keys, combo, strict=True)]
        context = [(split_override(t)[0], t) for t in base + fixed]  # what rules can match
        values = {k: split_override(t)[1] for k, t in _ordered(context + swept).items()}
        if any(matches(values, pat) for pat in study.exclude):
            excluded += 1
            continue
        variants = [list(swept)]
        for rule in study.rules:
            grown = []
            for var in variants:
                vals = {k: split_override(t)[1] for k, t in _ordered(context + var).items()}
                if not matches(vals, rule.get("match") or {}):
                    grown.append(var)
                    continue
                options = [[]]
                for k, v in rule["set"].items():
                    vs = sweep_values(str(k), v, f"study {study.name}: rule") \
                        if isinstance(v, str) else [fmt(v)]
                    options = [o + [(str(k), f"{k}={x}")] for o in options for x in vs]
                grown.extend(var + o for o in options)
            variants = grown
        for var in variants:
            ordered = _ordered([(split_override(t)[0], t) for t in base] + var +
                               [(split_override(t)[0], t) for t in fixed])
            overrides = list(ordered.values())
            params = list(_ordered(var).values())
            label = " ".join(params) or "(no sweep)"
            where = f"study {study.name}: job {len(jobs) + 1} ({label})"
            try:
                cfg = composer(overrides)
                validate(cfg)
                out = run_dir(cfg)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from e
            if out in by_dir:
                by_dir[out].duplicates.append(params)
                continue
            job = Job(len(jobs) + 1, overrides, params, cfg, out)
            by_dir[out] = job
            jobs.append(job)
    return Plan(study, jobs, combos, excluded, fixed, hydra_args)


class Composer:
    """`learnforget.config.compose`, once per distinct set of config-group choices (model=,
    method=, data=, ...); each job's value overrides (method.r=16, train.lr=...) are then
    applied to a copy the way Hydra applies them after composing the defaults, with the same
    checks (an unknown key is an error). Composing is ~0.3-1 s per call on a loaded 2-core
    machine; a 48-combination study needs 4 distinct group sets."""

    def __init__(self) -> None:
        self._base: dict[tuple[str, ...], DictConfig] = {}
        self._groups = {p.name for p in conf_dir().iterdir() if p.is_dir()}

    def is_group(self, text: str) -> bool:
        key = split_override(text)[0].split("@")[0]
        return "/" in key or key in self._groups

    def __call__(self, overrides: Sequence[str]) -> DictConfig:
        import copy

        try:
            from hydra._internal.config_loader_impl import ConfigLoaderImpl
        except ImportError:  # another Hydra: compose every job in full
            return compose(overrides)
        groups = tuple(o for o in overrides if self.is_group(o))
        values = [o for o in overrides if not self.is_group(o)]
        if groups not in self._base:
            self._base[groups] = compose(groups)
        cfg = copy.deepcopy(self._base[groups])
        try:
            ConfigLoaderImpl._apply_overrides_to_config(_parser().parse_overrides(values), cfg)
        except Exception as e:  # hydra / omegaconf errors, as config.compose words them
            from learnforget.config import hydra_error_message

            raise ConfigError(hydra_error_message(e)) from e
        return cfg


def refresh_states(plan: Plan) -> None:
    for job in plan.jobs:
        job.state, job.next_stage = job_state(job.cfg, job.run_dir)


# ============================================================================ cost estimate

_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
           ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
           ast.Pow: lambda a, b: a ** b}
_CMPS = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b,
         ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b,
         ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
         ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
_FUNCS = {"min": min, "max": max, "abs": abs, "round": round, "ceil": math.ceil,
          "log2": math.log2, "sqrt": math.sqrt}


def safe_eval(expr: str, names: dict[str, Any]) -> Any:
    """Arithmetic, comparisons, `x if c else y`, and/or/not, min/max/abs/round/ceil/log2/sqrt."""

    def ev(n: ast.AST) -> Any:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float, str, bool)):
            return n.value
        if isinstance(n, ast.Name):
            if n.id not in names:
                raise ConfigError(f"unknown name {n.id!r} (known: {', '.join(sorted(names))})")
            if names[n.id] is None:
                raise ConfigError(f"{n.id!r} is not known for this job")
            return names[n.id]
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd, ast.Not)):
            v = ev(n.operand)
            return -v if isinstance(n.op, ast.USub) else (+v if isinstance(n.op, ast.UAdd) else not v)
        if isinstance(n, ast.BoolOp):
            vals = [ev(v) for v in n.values]
            return all(vals) if isinstance(n.op, ast.And) else any(vals)
        if isinstance(n, ast.Compare) and all(type(o) in _CMPS for o in n.ops):
            left = ev(n.left)
            for op, right in zip(n.ops, n.comparators, strict=True):
                r = ev(right)
                if not _CMPS[type(op)](left, r):
                    return False
                left = r
            return True
        if isinstance(n, ast.IfExp):
            return ev(n.body) if ev(n.test) else ev(n.orelse)
        if isinstance(n, (ast.Tuple, ast.List)):
            return tuple(ev(e) for e in n.elts)
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _FUNCS
                and not n.keywords):
            return _FUNCS[n.func.id](*(ev(a) for a in n.args))
        raise ConfigError(f"unsupported expression: {ast.dump(n)[:60]}")

    try:
        tree = ast.parse(str(expr), mode="eval")
    except SyntaxError as e:
        raise ConfigError(f"cannot parse {expr!r}: {e.msg}") from e
    return ev(tree)


def estimate_names(cfg: DictConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """What a cost formula can use about a job: tokens trained, epochs, checkpoints, method..."""
    from learnforget.methods.registry import effective_method

    t = cfg.train
    at = [float(a) for a in t.checkpoints.at]
    unit = t.checkpoints.unit
    batch = int(t.batch_size) * int(t.grad_accum)
    names: dict[str, Any] = {k: v for k, v in extra.items()}
    epochs = max(at) if unit == "epochs" else None
    if unit == "tokens":
        tokens = max(at)
    elif unit == "steps":
        tokens = max(at) * batch * int(t.seq_len)
    else:
        tokens = epochs * float(extra["epoch_tokens"]) if "epoch_tokens" in extra else None
    if tokens is not None and str(t.get("cooldown_mode", "single")) == "branches":
        # the plateau run to the last branch point, then every budget's cooldown branch
        c = float(t.cooldown_ratio)
        tokens = (1 - c) * tokens + c * tokens / max(at) * sum(at)
    eff = effective_method(cfg.method)
    names.update({"tokens": tokens, "epochs": epochs, "checkpoints": len(at),
                  "method": str(cfg.method.name), "r": int(eff.get("r", 0) or 0),
                  "lr": float(t.lr), "seq_len": int(t.seq_len), "batch": batch,
                  "model": str(cfg.model.name), "data": str(cfg.data.name), "seed": int(cfg.seed),
                  "quant_type": str(eff.get("quant_type") or ""),
                  "dtype": str(cfg.model.dtype), "precision": str(t.precision)})
    return names


def estimate(plan: Plan) -> float | None:
    spec = plan.study.gpu_hours
    if spec is None:
        return None
    total = 0.0
    for job in plan.jobs:
        if isinstance(spec, (int, float)):
            job.gpu_hours = float(spec)
        else:
            try:
                job.gpu_hours = float(safe_eval(spec, estimate_names(job.cfg,
                                                                     plan.study.estimate_vars)))
            except (ConfigError, ArithmeticError, TypeError) as e:
                raise ConfigError(f"study {plan.study.name}: gpu_hours_per_job for job "
                                  f"{job.index}: {e}") from e
        total += job.gpu_hours
    return total


# ============================================================================ listing

def _rel(p: Path) -> str:
    """Relative to the working directory when inside it, else absolute."""
    try:
        rel = os.path.relpath(p)
    except ValueError:
        return str(p)
    return str(Path(p).resolve()) if rel.startswith("..") else rel


def shown_params(job: Job, params: list[str] | None = None) -> str:
    """The job's own overrides, without method keys its method ignores (rank for full)."""
    from learnforget.methods.registry import ignored_keys

    ignored = {f"method.{k}" for k in ignored_keys(job.cfg.method)}
    return " ".join(p for p in (job.params if params is None else params)
                    if split_override(p)[0] not in ignored)


def print_plan(plan: Plan, total: float | None, launcher: str) -> None:
    s = plan.study
    print(f"study {s.name} ({_rel(s.path)}): {s.description}")
    print(f"  experiment: {s.experiment_name}   stages: "
          f"{', '.join(plan.jobs[0].cfg.get('stages') or []) if plan.jobs else '-'}")
    print("  holds: " + " ".join(s.holds + plan.extra_fixed))
    if s.size:
        print(f"  size: {s.size} (its overrides are in `holds` above, after the study's own)")
    axes = " x ".join(f"{k} [{', '.join(v)}]" for k, v in s.sweep.items())
    if s.grid:
        print(f"  grid: {len(s.grid)} settings" + (f", crossed with {axes}" if axes else ""))
        for i, setting in enumerate(s.grid, 1):
            print(f"    {i:>2}. " + " ".join(t for _, t in setting))
    else:
        print(f"  sweeps: {axes or '(nothing: one job)'}")
    for r in s.rules:
        cond = " ".join(f"{k}={fmt(v)}" for k, v in (r.get("match") or {}).items()) or "always"
        print(f"  rule: {cond} -> " + " ".join(f"{k}={fmt(v)}" for k, v in r["set"].items()))
    for e in s.exclude:
        print("  exclude: " + " ".join(f"{k}={fmt(v)}" for k, v in e.items()))
    for n in s.notes:
        print(f"  note: {' '.join(n.split())}")
    width = max([len(_rel(j.run_dir)) for j in plan.jobs] + [10])
    print(f"\n{'#':>3}  {'state':<8} {'next':<8} {'GPU-h':>8}  {'run folder':<{width}}  overrides")
    for j in plan.jobs:
        gh = "-" if j.gpu_hours is None else f"{j.gpu_hours:.1f}"
        print(f"{j.index:>3}  {j.state:<8} {j.next_stage or '-':<8} {gh:>8}  "
              f"{_rel(j.run_dir):<{width}}  {shown_params(j)}")
        for d in j.duplicates:
            print(f"{'':>3}  {'':<8} {'':<8} {'':>8}  {'= same run as #' + str(j.index):<{width}}  "
                  f"{' '.join(d)}")
    counts = {st: sum(j.state == st for j in plan.jobs) for st in ("done", "running", "resume", "new")}
    dups = sum(len(j.duplicates) for j in plan.jobs)
    print(f"\n{plan.combinations} combinations"
          + (f", {plan.excluded} excluded" if plan.excluded else "")
          + f" -> {len(plan.jobs)} jobs ({dups} duplicate(s) merged: same run folder)")
    print("states: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if total is None:
        print("GPU-hours: no estimate in the study")
    else:
        todo = sum(j.gpu_hours or 0.0 for j in plan.jobs if j.state != "done")
        formula = s.gpu_hours if isinstance(s.gpu_hours, str) else f"{s.gpu_hours} per job"
        print(f"GPU-hours: {total:,.1f} in all, {todo:,.1f} still to run  (per job: {formula}"
              + (f"; {', '.join(f'{k}={v}' for k, v in s.estimate_vars.items())}" if s.estimate_vars
                 else "") + ")")
    n_launch = sum(j.state in ("new", "resume") for j in plan.jobs)
    print(f"launcher: {launcher}; would launch {n_launch} job(s)")


_PARAM_REPORTS: dict[str, Any] = {}  # memory_table's reports, per distinct setting (per process)


def memory_table(plan: Plan, activations: bool = False) -> list[dict[str, Any]]:
    """Per job: trainable parameters and the memory estimate of `learnforget params` (meta
    device, nothing downloaded; computed once per distinct model x method x optimizer (x batch
    shape with `activations`)), next to what the run measured once it has run (run.json:
    train.peak_mem_mb, and for qlora runs train.quantisation.mean_rel_error).

    est_mib: weights + gradients + optimizer state; with `activations`, peak_est_mib adds one
    training step's activations traced on the meta device (slower: ~1-2 s per setting for a
    7B model)."""
    import json
    import warnings

    from learnforget.files import read_json
    from learnforget.methods.registry import effective_method, method_summary
    from learnforget.train.params import param_report

    reports = _PARAM_REPORTS
    rows = []
    for job in plan.jobs:
        c = job.cfg
        eff = effective_method(c.method)
        shape = [int(c.train.batch_size), int(c.train.seq_len)] if activations else []
        policy = [str(c.train.precision), str(c.train.get("master_weights", "fp32")),
                  bool(c.train.get("activation_checkpointing", False))]
        key = json.dumps([OmegaConf.to_container(c.model, resolve=True), eff,
                          str(c.train.optimizer), *policy, *shape], sort_keys=True, default=str)
        if key not in reports:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # transformers/peft deprecation notices
                    try:
                        reports[key] = param_report(c, activations=activations)
                    except TypeError:  # a param_report without activation tracing
                        reports[key] = param_report(c)
            except Exception as e:  # a method the meta-device count cannot build: say so
                reports[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rep = reports[key]
        if c.method.name == "qlora":
            base = str(eff["quant_type"]) + ("+dq" if eff.get("double_quant") else "")
        else:
            base = str(c.model.dtype)
        train = (read_json(job.run_dir / "run.json") or {}).get("train") or {}
        quant = train.get("quantisation") or {}
        row = {"index": job.index, "method": method_summary(c.method), "model": str(c.model.name),
               "base": base, "trainable": None, "est_mib": None, "peak_est_mib": None,
               "error": None, "trainable_run": train.get("trainable_params"),
               "peak_mib": train.get("peak_mem_mb"), "quant_error": quant.get("mean_rel_error")}
        if isinstance(rep, str):
            row["error"] = rep
        else:
            if c.method.name != "qlora":  # the precision policy's dtype of the frozen weights
                row["base"] = str(getattr(rep, "frozen", base))
            row.update(trainable=rep.trainable, est_mib=rep.total_bytes / 2**20)
            if activations and getattr(rep, "activations_bytes", None) is not None:
                row["peak_est_mib"] = rep.peak_bytes / 2**20
        rows.append(row)
    return rows


def print_memory(rows: list[dict[str, Any]]) -> None:
    """The memory table of a dry run (see memory_table)."""
    if not rows:
        return
    with_act = any(r["peak_est_mib"] is not None for r in rows)
    quant = any(r["quant_error"] is not None for r in rows)
    print("\nmemory per job: est. = `learnforget params` on the meta device (weights + gradients "
          "+ optimizer state" + ("; est. peak adds one step's traced activations" if with_act
                                 else ", activations excluded: --activations traces them") +
          "); peak = measured, run.json train.peak_mem_mb (CUDA max allocated; on CPU the "
          "process's max RSS), '-' until the job has trained"
          + ("; quant err = mean relative error of the quantised base weights" if quant else ""))
    mw = max(len(r["method"]) for r in rows) + 1
    bw = max(len(r["base"]) for r in rows + [{"base": "base"}]) + 1
    print(f"{'#':>3}  {'method':<{mw}} {'base':<{bw}} {'trainable':>15} {'est. MiB':>12}"
          + (f" {'est. peak MiB':>14}" if with_act else "") + f" {'peak MiB':>10}"
          + (f" {'quant err':>10}" if quant else ""))
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
        head = f"{r['index']:>3}  {r['method']:<{mw}} {r['base']:<{bw}}"
        if r["error"]:
            print(f"{head} {'n/a':>15} {'n/a':>12} {peak:>10}  ({r['error']})")
            continue
        pe = "-" if r["peak_est_mib"] is None else f"{r['peak_est_mib']:,.1f}"
        qe = "-" if r["quant_error"] is None else f"{r['quant_error']:.4f}"
        print(f"{head} {r['trainable']:>15,} {r['est_mib']:>12,.1f}"
              + (f" {pe:>14}" if with_act else "") + f" {peak:>10}"
              + (f" {qe:>10}" if quant else ""))


def print_data_budget(plan: Plan) -> None:
    """Per job: its token budget against its corpus (learnforget.data.budget.budget_report)."""
    from learnforget.data.budget import budget_report, format_budget_rows

    if not plan.jobs:
        return
    rows = [budget_report(j.cfg) for j in plan.jobs]
    print("\n" + format_budget_rows(rows, [j.index for j in plan.jobs]))


def print_fit(plan: Plan, profile: Path, methods: list[str]) -> None:
    """Whether each job fits the GPUs of its cluster profile (learnforget.train.gpu_fit), and its
    global batch against the study's."""
    from learnforget.train import gpu_fit

    gp = gpu_fit.gpu_plan(profile_resources(profile))
    rows = [gpu_fit.check(j.cfg, gp) for j in plan.jobs]
    print(f"\ncluster profile {_rel(profile)}: {gp.ranks} GPU(s) per job"
          + (f", {gp.gpu_mem_gib:g} GB each" if gp.gpu_mem_gib else ", gpu_mem_gb not set"))
    print(gpu_fit.format_rows(rows, methods))
    want = plan.study.global_batch
    bad = [r for r in rows if want and r["global_batch"] != want]
    if bad:
        print(f"WARNING: the study's global batch is {want} sequences, but {len(bad)} job(s) "
              f"would step on {bad[0]['global_batch']} (train.batch_size x train.grad_accum x "
              f"{gp.ranks} ranks): set train.grad_accum to match this profile")
    n_bad = sum(r["fits"] is False for r in rows)
    print(f"fit: {len(rows) - n_bad} of {len(rows)} job(s) fit"
          + (f"; {n_bad} do NOT (see the advice)" if n_bad else ""))


# ============================================================================ cluster profile

def _slurm_conf_cls():
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    return SlurmQueueConf


def cluster_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(_slurm_conf_cls())
            if f.name not in ("_target_", "submitit_folder", "name")]


def cluster_profile_path(explicit: str | os.PathLike | None = None,
                         study_default: str | None = None) -> Path:
    """--cluster FILE, else $LEARNFORGET_CLUSTER, else the study's `cluster` (a profile its jobs
    need, e.g. 8 GPUs for FSDP), else ~/.config/learnforget/cluster.yaml, else
    conf/cluster/default.yaml."""
    if not explicit and not os.environ.get("LEARNFORGET_CLUSTER") and study_default:
        explicit = study_default
    if explicit:
        p = Path(explicit).expanduser()
        named = conf_dir() / "cluster" / f"{explicit}.yaml"  # --cluster fsdp_8gpu
        if not p.exists() and p.suffix == "" and named.exists():
            return named
        if not p.exists():
            raise ConfigError(f"cluster profile {p} not found")
        return p
    env = os.environ.get("LEARNFORGET_CLUSTER")
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise ConfigError(f"cluster profile {p} (from LEARNFORGET_CLUSTER) not found")
        return p
    user = Path("~/.config/learnforget/cluster.yaml").expanduser()
    return user if user.exists() else conf_dir() / "cluster" / "default.yaml"


OWN_PROFILE_KEYS = ("gpu_mem_gb",)  # learnforget's own profile keys: never passed to submitit


def profile_resources(path: str | os.PathLike) -> dict[str, Any]:
    """The GPUs a profile gives one job (nodes, tasks_per_node, gpu_mem_gb), for fit checks."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    load_cluster_profile(path)  # the same checks as a launch
    return {k: raw.get(k) for k in ("nodes", "tasks_per_node", "gpus_per_node", "gpu_mem_gb")}


def load_cluster_profile(path: str | os.PathLike) -> dict[str, Any]:
    """The SLURM settings of a profile file, checked against the launcher's fields (and
    learnforget's own keys, which are checked and left out)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cluster profile {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"cluster profile {path}: expected a mapping of key: value")
    known = cluster_keys() + list(OWN_PROFILE_KEYS)
    for key in raw:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"cluster profile {path}: unknown key {key!r}{hint}; expected one "
                              f"of: {', '.join(known)}")
    own = {k: raw.pop(k) for k in OWN_PROFILE_KEYS if k in raw}
    mem = own.get("gpu_mem_gb")
    if mem is not None and not (isinstance(mem, (int, float)) and mem > 0):
        raise ConfigError(f"cluster profile {path}: gpu_mem_gb must be a positive number (GB of "
                          f"one GPU), got {mem!r}")
    merged = OmegaConf.structured(_slurm_conf_cls())
    for key, value in raw.items():
        try:
            merged = OmegaConf.merge(merged, {key: value})
        except Exception as e:  # omegaconf validation errors: wrong types
            raise ConfigError(f"cluster profile {path}: {key}: "
                              f"{str(e).splitlines()[0]}") from e
    out = {k: OmegaConf.to_container(merged, resolve=False)[k] for k in raw}
    if int(merged.timeout_min) <= 10 and int(merged.max_num_timeout) == 0:
        print(f"learnforget: warning: cluster profile {path}: with timeout_min <= 10 submitit "
              "treats every signal as a timeout and max_num_timeout=0 then fails the job; "
              "use timeout_min > 10 or max_num_timeout >= 1", file=sys.stderr)
    return out


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def sbatch_script(profile: dict[str, Any], n_jobs: int, folder: Path) -> str:
    """The sbatch script submitit would submit for a job array of `n_jobs` with this profile:
    the profile on SlurmQueueConf's defaults, mapped to submitit as hydra-submitit-launcher
    maps it (its `launch`)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    try:
        merged = OmegaConf.merge(OmegaConf.structured(_slurm_conf_cls()), profile)
    except Exception as e:  # omegaconf: a hydra.launcher.* override of an unknown key or type
        raise ConfigError(f"SLURM launcher settings: {_one_line(e)}") from e
    params = {k: v for k, v in OmegaConf.to_container(merged, resolve=False).items()
              if k not in ("_target_", "submitit_folder")}
    params["name"] = "learnforget-preflight"  # the real name is an interpolation of Hydra's
    max_num_timeout = params.pop("max_num_timeout")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    try:
        executor = submitit.AutoExecutor(cluster="slurm", folder=str(folder),
                                         slurm_max_num_timeout=max_num_timeout)
    except RuntimeError as e:  # no srun: submitit cannot run jobs here
        raise ConfigError(f"--launcher submitit_slurm: {e} (srun is not on PATH)") from e
    try:
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v
                                      for k, v in params.items()})
    except ValueError as e:
        raise ConfigError(f"cluster profile: {_one_line(e)}") from e
    slurm = executor._executor
    if n_jobs > 1:  # submitit submits several jobs as one array
        slurm.parameters["map_count"] = n_jobs
    return slurm._make_submission_file_text("true", "preflight")


def slurm_preflight(profile: dict[str, Any], where: Path, n_jobs: int,
                    hydra_overrides: Sequence[str] = ()) -> str:
    """Ask SLURM, before anything is written or submitted, whether it accepts the sweep's job
    array as submitit will submit it: `sbatch --test-only` on the same script (partition,
    account, qos, time, memory, GPUs, array...). A refusal is one ConfigError quoting sbatch.
    Returns sbatch's answer (when and where the jobs would start)."""
    import subprocess
    import tempfile

    profile = dict(profile)
    for text in hydra_overrides:  # hydra.launcher.partition=... on the command line
        key, value = split_override(text)
        if key.startswith("hydra.launcher."):
            profile[key.removeprefix("hydra.launcher.")] = yaml.safe_load(value)
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("--launcher submitit_slurm submits with sbatch, which is not on PATH "
                          "(run the sweep on a SLURM login node)")
    settings = ", ".join(f"{k}={v}" for k, v in profile.items()
                         if k in ("partition", "account", "qos", "timeout_min", "mem_gb",
                                  "gpus_per_node", "tasks_per_node", "nodes", "cpus_per_task",
                                  "gres", "constraint"))
    with tempfile.TemporaryDirectory(prefix="learnforget-preflight-") as tmp:
        script = sbatch_script(profile, n_jobs, Path(tmp))
        try:
            p = subprocess.run([sbatch, "--test-only"], input=script, capture_output=True,
                               text=True, timeout=120)
        except subprocess.TimeoutExpired as e:
            raise ConfigError("sbatch --test-only did not answer within 120 s (is slurmctld "
                              "reachable?); nothing was submitted") from e
    if p.returncode != 0:
        raise ConfigError(
            f"SLURM refuses the job array ({n_jobs} job(s); cluster profile {where}: {settings}); "
            f"nothing was submitted. sbatch --test-only said: "
            f"{_one_line(p.stderr or p.stdout) or f'exit status {p.returncode}'}")
    return _one_line(p.stderr or p.stdout)


def submission_refusal(error: BaseException) -> str | None:
    """sbatch's error text when `error` (raised by a launcher) is a refused sbatch submission
    (submitit raises FailedJobError from the failed sbatch call), else None."""
    import subprocess

    seen = error
    while seen is not None:
        if isinstance(seen, subprocess.CalledProcessError):
            cmd = seen.cmd if isinstance(seen.cmd, (list, tuple)) else str(seen.cmd).split()
            if cmd and Path(str(cmd[0])).name == "sbatch":
                return _one_line(seen.stderr or seen.output or error) or str(seen)
        if type(seen).__name__ == "FailedSubmissionError":
            return _one_line(seen)
        seen = seen.__cause__ or seen.__context__
    return None


# ============================================================================ launching

def _register_hydra_nodes(slurm: dict[str, Any] | None) -> None:
    """Register the job-list sweeper (and the SLURM profile as a launcher config) in Hydra."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance().register(JobListSweeper)
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name=SWEEPER_NAME, provider="learnforget",
             node={"_target_": f"{JobListSweeper.__module__}.{JobListSweeper.__name__}"})
    if slurm is not None:
        cs.store(group="hydra/launcher", name=SLURM_NODE_NAME, provider="learnforget",
                 node=_slurm_conf_cls()(**slurm))


def _make_sweeper_class():
    from hydra.plugins.sweeper import Sweeper

    class JobListSweeper(Sweeper):
        """Hands an explicit list of jobs (each a full override list) to the launcher, as
        BasicSweeper does with the product of its axes; failures are reported, not raised."""

        def __init__(self) -> None:
            self.config = None
            self.launcher = None

        def setup(self, *, hydra_context, task_function, config) -> None:
            from hydra.core.plugins import Plugins

            self.config = config
            self.launcher = Plugins.instance().instantiate_launcher(
                hydra_context=hydra_context, task_function=task_function, config=config)

        def sweep(self, arguments: list[str]) -> Any:
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
            (sweep_dir / "jobs.yaml").write_text(yaml.safe_dump([list(j) for j in _PENDING]))
            try:
                results = self.launcher.launch([list(j) for j in _PENDING], initial_job_idx=0)
            except Exception as e:
                refused = submission_refusal(e)
                if refused is None:
                    raise
                _REFUSED[:] = [refused]  # launch() turns it into one error line
                return []
            _RESULTS[:] = list(results)
            return results

    # Hydra instantiates plugins only from the hydra_plugins namespace (it imports the
    # `_target_`), so the class is published there as a module made here and registered by
    # hand (Plugins.register). It is needed in the launching process only: launchers
    # re-create Hydra's plugins in their workers, and workers never sweep.
    import types

    name = "hydra_plugins.learnforget_sweeper"
    module = sys.modules.get(name) or types.ModuleType(name)
    JobListSweeper.__module__ = name
    JobListSweeper.__qualname__ = "JobListSweeper"
    module.JobListSweeper = JobListSweeper
    sys.modules[name] = module
    return JobListSweeper


JobListSweeper = _make_sweeper_class()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def launch(plan: Plan, launcher: str, cluster: str | None = None) -> list[Any]:
    """Run the jobs that are not done as one Hydra multirun of run_job; returns JobReturns."""
    from hydra.core.global_hydra import GlobalHydra

    from learnforget.cli import run_hydra

    todo = [j for j in plan.jobs if j.state in ("new", "resume")]
    if not todo:
        return []
    job_overrides = [list(j.overrides) for j in todo]
    hydra_args = ["-m", f"hydra/sweeper={SWEEPER_NAME}"]
    sets_threads = any(split_override(o)[0] == "train.num_threads" for o in job_overrides[0])
    slurm = None
    if launcher == "basic":
        hydra_args.append("hydra/launcher=basic")
    elif launcher == "submitit_local":
        hydra_args += ["hydra/launcher=submitit_local",
                       f"hydra.launcher.timeout_min={LOCAL_TIMEOUT_MIN}"]
        threads = max(1, usable_cores() // len(todo))
        print(f"learnforget: submitit_local runs all {len(todo)} job(s) side by side on "
              f"{usable_cores()} core(s): train.num_threads={threads} each"
              + (" (kept from the overrides)" if sets_threads else ""))
        if not sets_threads:
            job_overrides = [o + [f"train.num_threads={threads}"] for o in job_overrides]
        hydra_args.append(f"hydra.launcher.cpus_per_task={threads}")
    elif launcher not in LAUNCHERS:  # a launcher config of conf/hydra/launcher/, as it is
        hydra_args.append(f"hydra/launcher={launcher}")
    else:
        path = cluster_profile_path(cluster)
        slurm = load_cluster_profile(path)
        print(f"learnforget: SLURM profile {path}: "
              + ", ".join(f"{k}={v}" for k, v in slurm.items()))
        answer = slurm_preflight(slurm, path, len(todo), plan.hydra_overrides)
        print(f"learnforget: sbatch --test-only accepts the job array: {answer}")
        hydra_args.append(f"hydra/launcher={SLURM_NODE_NAME}")
        cpus = slurm.get("cpus_per_task")
        if cpus and not sets_threads:
            job_overrides = [o + [f"train.num_threads={cpus}"] for o in job_overrides]
    runs_root = Path(todo[0].cfg.paths.runs_dir).resolve()
    base_dir = runs_root / "_hydra" / f"{time.strftime('%Y-%m-%d/%H-%M-%S')}-{plan.study.name}"
    path, n = base_dir, 1
    while path.exists():  # two launches within a second
        n += 1
        path = base_dir.with_name(f"{base_dir.name}-{n}")
    sweep_dir = str(path).replace("'", "\\'")
    hydra_args += [f"hydra.sweep.dir='{sweep_dir}'", f"hydra.job.name='lf-{plan.study.name}'",
                   *plan.hydra_overrides]
    _register_hydra_nodes(slurm)
    _PENDING[:] = job_overrides
    _RESULTS.clear()
    _REFUSED.clear()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    print(f"learnforget: launching {len(todo)} job(s) of study {plan.study.name} with "
          f"{launcher} (logs: {_rel(Path(sweep_dir))})")
    try:
        run_hydra("sweep", run_job, hydra_args)
    finally:
        _PENDING.clear()
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
    if _REFUSED:
        raise ConfigError(f"SLURM refused the submission of study {plan.study.name} "
                          f"({len(todo)} job(s) with {launcher}); no job started. sbatch said: "
                          f"{_REFUSED[0]}")
    return list(_RESULTS)


def report_results(results: Sequence[Any], launched: Sequence[Job]) -> None:
    """One line per failed job: its number in the listing, run folder and the error."""
    from hydra.core.utils import JobStatus

    for r, job in zip(results, launched, strict=False):
        if r.status == JobStatus.FAILED:
            err = r._return_value
            text = str(err).strip().splitlines()[0] if str(err).strip() else ""
            log = next(iter(sorted(Path(r.working_dir).glob("*.log"))), None) \
                if getattr(r, "working_dir", None) else None
            print(f"learnforget: job #{job.index} ({job.run_dir.name}) failed: "
                  f"{type(err).__name__}: {text}" + (f" (log: {log})" if log else ""),
                  file=sys.stderr)


# ============================================================================ command

USAGE = """usage: learnforget sweep STUDY [--dry-run] [--launcher basic|submitit_local|submitit_slurm|...]
                         [--cluster FILE] [--size NAME] [--activations] [--no-analyze]
                         [key=value ...]
STUDY is a file name in sweeps/ (without .yaml) or a path; --size picks one of the study's
`sizes` (e.g. toy: the same grid on a tiny model on this CPU); --activations adds the traced
activation memory to the dry run's memory table. Studies: {studies}"""


def sweep_main(study: str, overrides: Sequence[str] = (), *, dry_run: bool = False,
               launcher: str | None = None, cluster: str | None = None,
               analyze: bool | None = None, size: str | None = None,
               activations: bool = False) -> int:
    s, overrides = apply_size(load_study(find_study(study)), size, overrides)
    launcher = launcher or s.launcher
    if launcher not in available_launchers():
        raise ConfigError(f"--launcher {launcher!r} is unknown (expected one of: "
                          f"{', '.join(available_launchers())})")
    cluster = str(cluster_profile_path(cluster, s.cluster)) if launcher == "submitit_slurm" \
        else cluster
    if launcher == "submitit_slurm":
        load_cluster_profile(cluster)  # a bad profile fails before jobs
    t0 = time.perf_counter()
    plan = expand(s, overrides)
    refresh_states(plan)
    total = estimate(plan)
    print_plan(plan, total, launcher)
    print(f"(composed and checked {plan.combinations} combination(s) in "
          f"{time.perf_counter() - t0:.1f}s)")
    if dry_run:
        print_data_budget(plan)
        t0 = time.perf_counter()
        rows = memory_table(plan, activations=activations)
        print_memory(rows)
        if launcher == "submitit_slurm" and plan.jobs:
            print_fit(plan, Path(cluster), [r["method"] for r in rows])
        print(f"(parameter reports in {time.perf_counter() - t0:.1f}s)")
        return 0
    todo = [j for j in plan.jobs if j.state in ("new", "resume")]
    launched = launch(plan, launcher, cluster)
    report_results(launched, todo)
    if not launched:
        print(f"learnforget: nothing to launch: all {len(plan.jobs)} job(s) of study {s.name} "
              "are done" + (" or running" if any(j.state == "running" for j in plan.jobs) else ""))
    refresh_states(plan)
    if launched:
        print("\n" + "\n".join(f"{j.index:>3}  {j.state:<8} {_rel(j.run_dir)}" for j in plan.jobs))
    done = sum(j.state == "done" for j in plan.jobs)
    print(f"learnforget: study {s.name}: {done}/{len(plan.jobs)} job(s) done, "
          f"{len(launched)} launched now")
    root = Path(plan.jobs[0].cfg.paths.runs_dir).resolve() / s.experiment_name if plan.jobs else None
    want_analysis = s.analyze if analyze is None else analyze
    if want_analysis and root is not None and done and (launched or not (root / "_analysis").exists()):
        from learnforget.analysis.stage import analyze as run_analysis

        run_analysis(root, cache_dir=Path(plan.jobs[0].cfg.paths.cache_dir).expanduser())
    return 0 if done == len(plan.jobs) else 1


def sweep_cli(args: Sequence[str]) -> int:
    args = list(args)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE.format(studies=", ".join(available_studies()) or "(none)"))
        return 0 if args else 2
    opts: dict[str, Any] = {"dry_run": False, "launcher": None, "cluster": None, "analyze": None,
                            "size": None, "activations": False}
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--dry-run", "-n"):
            opts["dry_run"] = True
        elif a == "--no-analyze":
            opts["analyze"] = False
        elif a == "--activations":
            opts["activations"] = True
        elif (a in ("--launcher", "--cluster", "--size")
              or a.startswith(("--launcher=", "--cluster=", "--size="))):
            name = a.split("=", 1)[0][2:]
            if "=" in a:
                value = a.split("=", 1)[1]
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"{a} needs a value")
            opts[name] = value
        elif a.startswith("-"):
            raise ConfigError(f"unknown option {a!r}\n{USAGE.format(studies='...')}")
        else:
            rest.append(a)
        i += 1
    if not rest:
        raise ConfigError("which study? " + USAGE.format(studies=", ".join(available_studies())))
    return sweep_main(rest[0], rest[1:], **opts)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        sys.exit(sweep_cli(sys.argv[1:]))
    except ConfigError as e:
        print(f"learnforget: error: {e}", file=sys.stderr)
        sys.exit(2)
