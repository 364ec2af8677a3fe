"""A study file (sweeps/*.yaml) as data: parse and check it, apply a size, and expand it into
the override list of every job. Pure: no Hydra config loading, no globals; the only I/O is
reading the study file (and listing sweeps/ to name the studies).

    description: what the study is for (printed by the dry run)
    experiment_name: runs/<experiment_name>/... (default: the file's name)
    holds: [key=value, ...]           fixed for every job (Hydra overrides; or a mapping)
    sweep: {key: [v1, v2] | "v1,v2"}  the grid: the product of every axis (Hydra multirun syntax)
    grid: [{key: value, ...}, ...]    settings whose values go together, crossed with `sweep`
    rules: [{match: {key: value}, set: {key: value}}]   per-combination settings ("a,b" expands)
    exclude: [{key: value}, ...]      combinations to drop (a list value matches any of it)
    stages: [train, eval, spectra]    what each job runs (default: the config's `stages`)
    gpu_hours_per_job: 12.5           a number per job, or `cost:` (learnforget.studies.cost)
    launcher, cluster, global_batch, analyze, notes, sizes: see sweeps/README.md
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from learnforget.config import conf_dir
from learnforget.errors import ConfigError
from learnforget.studies.cost import Cost, parse_cost
from learnforget.studies.values import fmt, matches, split_override

STUDY_KEYS = ("description", "experiment_name", "holds", "sweep", "grid", "rules", "exclude",
              "stages", "gpu_hours_per_job", "cost", "launcher", "analyze", "notes", "sizes",
              "cluster", "global_batch")
SIZE_KEYS = ("overrides", "launcher", "gpu_hours_per_job", "cost", "experiment_name", "analyze")
LAUNCHERS = ("basic", "submitit_local", "submitit_slurm")


def studies_dir() -> Path:
    env = os.environ.get("LEARNFORGET_SWEEPS_DIR")
    return Path(env) if env else conf_dir().parent / "sweeps"


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
    cost: Cost | float | None          # a cost model, or GPU-hours per job
    launcher: str
    analyze: bool
    notes: list[str]
    grid: list[list[tuple[str, str]]] = field(default_factory=list)  # each: [(key, override)]
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)
    size: str | None = None            # the size in use (apply_size)
    cluster: str | None = None         # the cluster profile its jobs need (clusters/NAME.yaml)
    global_batch: int | None = None    # sequences per optimizer step, over all ranks


# ----------------------------------------------------------------------------- overrides

def _parse(text: str):
    """Hydra's override grammar (its public parser, as sweeper plugins use it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(text)


def sweep_values(key: str, spec: Any, where: str) -> list[str]:
    """The values of one sweep axis: a YAML list, or a string in Hydra multirun syntax."""
    if isinstance(spec, list):
        values = [fmt(v) for v in spec]
    elif isinstance(spec, str):
        try:
            o = _parse(f"{key}={spec}")
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


def is_sweep(text: str) -> bool:
    try:
        return _parse(text).is_sweep_override()
    except Exception:
        return False


def _override_list(value: Any, what: str) -> list[str]:
    """A study's list of key=value overrides, also accepted as a mapping."""
    value = value or []
    if isinstance(value, dict):
        value = [f"{k}={fmt(v)}" for k, v in value.items()]
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise ConfigError(f"{what} must be a list of key=value overrides or a mapping")
    for o in value:
        split_override(o)
    return value


# ----------------------------------------------------------------------------- parsing

def _per_job_cost(raw: dict[str, Any], where: str) -> Cost | float | None:
    gpu, cost = raw.get("gpu_hours_per_job"), raw.get("cost")
    if gpu is not None and cost is not None:
        raise ConfigError(f"{where}: give gpu_hours_per_job (a number) or cost, not both")
    if gpu is not None:
        if isinstance(gpu, bool) or not isinstance(gpu, (int, float)):
            raise ConfigError(f"{where}: gpu_hours_per_job must be a number, got {gpu!r} (a "
                              "formula is now a `cost:` mapping, see sweeps/README.md)")
        return float(gpu)
    return None if cost is None else parse_cost(cost, f"{where}: cost")


def _launcher(value: Any, what: str) -> str:
    if value not in LAUNCHERS:
        raise ConfigError(f"{what} {value!r} is unknown (expected one of: {', '.join(LAUNCHERS)}; "
                          "SLURM settings go in a cluster profile, --cluster FILE)")
    return str(value)


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
        if is_sweep(h):
            raise ConfigError(f"{where}: holds fixes one value per key; {h!r} sweeps (move it "
                              "under `sweep`)")
    axes = raw.get("sweep") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"{where}: sweep must map a key to its values")
    sweep = {str(k): sweep_values(str(k), v, where) for k, v in axes.items()}
    sizes = raw.get("sizes") or {}
    if not isinstance(sizes, dict):
        raise ConfigError(f"{where}: sizes must map a name to {{overrides: [...], ...}} or a list")
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
    notes = raw.get("notes") or []
    notes = [notes] if isinstance(notes, str) else [str(n) for n in notes]
    gb = raw.get("global_batch")
    if gb is not None and not (isinstance(gb, int) and gb > 0):
        raise ConfigError(f"{where}: global_batch must be a positive integer, got {gb!r}")
    return Study(path.stem, path, " ".join(str(raw["description"]).split()),
                 str(raw.get("experiment_name") or path.stem), list(holds), sweep, rules,
                 exclude, stages, _per_job_cost(raw, where),
                 _launcher(raw.get("launcher", "basic"), f"{where}: launcher"),
                 bool(raw.get("analyze", False)), notes,
                 parse_grid(raw.get("grid"), set(sweep), where),
                 {str(k): parse_size(str(k), v, where) for k, v in sizes.items()},
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
        out.extend(_options(entry, f"{where}: grid[{i}]"))
    return out


def _options(mapping: dict[str, Any], where: str) -> list[list[tuple[str, str]]]:
    """{key: value} -> every [(key, key=value)] it stands for ("a,b" strings expand)."""
    options: list[list[tuple[str, str]]] = [[]]
    for k, v in mapping.items():
        vs = sweep_values(str(k), v, where) if isinstance(v, str) else [fmt(v)]
        options = [o + [(str(k), f"{k}={x}")] for o in options for x in vs]
    return options


def parse_size(name: str, raw: Any, where: str) -> dict[str, Any]:
    """One entry of `sizes:`: a list of overrides, or {overrides, launcher, gpu_hours_per_job |
    cost, experiment_name, analyze}."""
    spec = {"overrides": raw} if isinstance(raw, list) else raw
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: sizes.{name} must be a list of overrides or a mapping of "
                          f"{', '.join(SIZE_KEYS)}")
    unknown = [k for k in spec if k not in SIZE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: sizes.{name}: unknown key(s) {unknown} (expected: "
                          f"{', '.join(SIZE_KEYS)})")
    out = {**spec, "overrides": _override_list(spec.get("overrides"),
                                               f"{where}: sizes.{name}.overrides")}
    if spec.get("launcher") is not None:
        _launcher(spec["launcher"], f"{where}: sizes.{name}.launcher")
    if "gpu_hours_per_job" in spec or "cost" in spec:
        out["cost"] = _per_job_cost(spec, f"{where}: sizes.{name}")
    return out


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
        cost=spec["cost"] if "cost" in spec else study.cost,
        analyze=bool(spec.get("analyze", study.analyze)))
    return changed, list(spec["overrides"]) + list(extra)


# ----------------------------------------------------------------------------- expansion

def _ordered(entries: Sequence[tuple[str, str]]) -> dict[str, str]:
    """key -> full override text; a later entry replaces an earlier one in place."""
    out: dict[str, str] = {}
    for key, text in entries:
        out[key] = text
    return out


def _keyed(texts: Sequence[str]) -> list[tuple[str, str]]:
    return [(split_override(t)[0], t) for t in texts]


@dataclass
class Expansion:
    """The jobs of a study as override lists, before they are composed."""
    jobs: list[tuple[list[str], list[str]]]   # (every override in order, the varying part)
    combinations: int
    excluded: int
    fixed: list[str]                          # command-line overrides for every job
    hydra: list[str]                          # hydra.* overrides (launcher settings)


def expand_overrides(study: Study, extra: Sequence[str] = ()) -> Expansion:
    """Grid x sweep axes, minus `exclude`, grown by `rules`; `extra` (the command line) fixes
    a value (or replaces an axis when it sweeps)."""
    axes = dict(study.sweep)
    fixed: list[str] = []
    hydra: list[str] = []
    for text in extra:
        key, value = split_override(text)
        if key.startswith(("hydra.", "hydra/")):
            hydra.append(text)
        elif is_sweep(text):
            axes[key] = sweep_values(key, value, "command line")
        elif key in axes and not text.startswith(("+", "~")):
            axes[key] = [value]
        else:
            fixed.append(text)
    base = [f"experiment_name={study.experiment_name}"]
    if study.stages is not None:
        base.append(f"stages={fmt(study.stages)}")
    base += study.holds
    context = _keyed(base + fixed)  # what rules and exclusions can match
    keys = list(axes)
    jobs: list[tuple[list[str], list[str]]] = []
    combos = excluded = 0
    for setting, combo in itertools.product(study.grid or [[]],
                                            itertools.product(*(axes[k] for k in keys))):
        combos += 1
        swept = list(setting) + [(k, f"{k}={v}") for k, v in zip(keys, combo, strict=True)]
        values = {k: split_override(t)[1] for k, t in _ordered(context + swept).items()}
        if any(matches(values, pat) for pat in study.exclude):
            excluded += 1
            continue
        variants = [swept]
        for rule in study.rules:
            grown = []
            for var in variants:
                vals = {k: split_override(t)[1] for k, t in _ordered(context + var).items()}
                if matches(vals, rule.get("match") or {}):
                    grown += [var + o for o in _options(rule["set"], f"study {study.name}: rule")]
                else:
                    grown.append(var)
            variants = grown
        for var in variants:
            ordered = _ordered(_keyed(base) + var + _keyed(fixed))
            jobs.append((list(ordered.values()), list(_ordered(var).values())))
    return Expansion(jobs, combos, excluded, fixed, hydra)
