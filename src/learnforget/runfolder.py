"""The run folder contract: where a run keeps what, its typed record (run.json) and its lock.

No other module builds these paths: it asks a ``RunFolder`` (or ``runs_root``/``base_dir``).

    <runs root>/                     paths.runs_dir
      _base/<model id>/              base-model scores and drift references, shared by runs
      _analysis/                     tables and figures of `learnforget analyze`
      <experiment>/<run name>/       one run: RunFolder(path)

The files of one run are listed in LAYOUT (the block in docs/run-folder.md is checked against
it). run.json holds a RunRecord: ``status``, ``run`` (RunInfo: what was trained), ``train``
(TrainInfo: how, and how far), ``meta`` (MetaInfo: versions, git, host), and, when they
apply, ``cooldown`` and ``intruder_mitigation``; with ``schema_version``. Folders written
before schema_version (version 1: the same sections, no version key) read as they are.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import socket
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from learnforget.console import LOG_NAME
from learnforget.errors import ConfigError
from learnforget.files import (
    Lock,
    atomic_write_json,
    is_locked,
    read_json,
    read_result,
    try_lock,
    unlock,
)

SCHEMA_VERSION = 2
BASE = "_base"  # <runs root>/_base/<model id>/: shared base-model results
ANALYSIS = "_analysis"  # <runs root>/_analysis/: tables and figures of `learnforget analyze`
MANIFEST = "manifest.json"  # in each checkpoint folder: label, step, tokens, loss, format

# What a run folder holds: name -> (path inside it, what it is). <label>: a checkpoint label
# such as step-000004; <suite>: an eval suite's name.
LAYOUT: dict[str, tuple[str, str]] = {
    "config": ("config.yaml", "the resolved config (secrets redacted)"),
    "record": ("run.json", "RunRecord: status and the run, train, meta sections (below)"),
    "log": (LOG_NAME, "what the libraries said during each stage (lm-eval, warnings)"),
    "job": ("job.json", "what the last `learnforget job` did per stage; `launches`: every "
            "launch's stages, wall and process CPU seconds"),
    "lock": (".lock", "held while a process trains the run (the OS drops it on exit; where "
             "flock does not span nodes, .lock.excl: a lock file with a heartbeat)"),
    "tokenizer": ("tokenizer/", "the tokenizer, for eval"),
    "metrics": ("train/metrics.jsonl", "per step: loss, lr, grad_norm, tokens, tokens_per_s, "
                "wall_time_s and cpu_time_s (from the run's start, over resumes), peak_mem_mb; "
                "per checkpoint (and step 0): heldout_loss"),
    "resume": ("train/resume.pt", "resume state (weights, optimizer, schedule, RNG, data "
               "position; FSDP: + train/resume-shards-*/); removed when the run finishes"),
    "checkpoint": ("checkpoints/<label>/", "adapter files or model.safetensors + "
                   f"{MANIFEST} (step, tokens, epoch, loss, heldout_loss, format)"),
    "eval_result": ("eval/<label>.json", "one checkpoint's scores on a suite"),
    "eval_summary": ("eval/summary-<suite>.json", "one row per checkpoint and the base "
                     "(+ .csv)"),
    "eval_tasks": ("eval/tasks/", "the lm-eval task folder written for the suite"),
    "spectra": ("spectra/<label>.json", "singular values of each module's delta W"),
    "intruders": ("intruders/<label>.json", "intruder dimensions of each module"),
    "branch": ("branches/<label>/", "train.cooldown_mode=branches: a budget's cooldown, a "
               "run folder of its own"),
    "wandb": ("wandb/", "the W&B mirror when logger=wandb (`wandb sync` uploads it)"),
}


def runs_root(cfg: Any) -> Path:
    """The folder holding every experiment's runs (config key paths.runs_dir)."""
    return Path(cfg.paths.runs_dir).resolve()


def base_dir(root: Path, model_id: str) -> Path:
    """Where base model `model_id`'s scores and drift references are cached under a runs root."""
    return Path(root) / BASE / model_id


def find_runs(root: Path) -> list[Path]:
    """Run folders (holding run.json) under root, skipping folders whose name starts with
    '_' or '.' (the shared _base scores, _hydra logs, _analysis output)."""
    root = Path(root)
    record = LAYOUT["record"][0]
    if (root / record).exists():
        return [root]
    found = []
    for here, dirs, files in os.walk(root):
        if record in files:
            found.append(Path(here))
            dirs[:] = []  # a run folder holds no further runs
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
    return sorted(found)


# ----------------------------------------------------------------------------- run.json

@dataclass(kw_only=True)
class Section:
    """A run.json section: known keys as fields; keys it does not know kept in `extra`."""

    extra: dict[str, Any] = field(default_factory=dict)
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Any:
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: d.pop(k) for k in list(d) if k in names}, extra=d)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for k in self.OMIT_IF_NONE:
            if out.get(k) is None:
                out.pop(k, None)
        return {**out, **self.extra}


@dataclass(kw_only=True)
class RunInfo(Section):
    """What was trained: the run's identity."""

    name: str | None = None
    experiment: str | None = None
    config_hash: str | None = None
    model: str | None = None
    base_model: str | None = None
    method: str | None = None
    method_summary: str | None = None
    method_settings: dict[str, Any] = field(default_factory=dict)
    ignored_method_keys: list[str] = field(default_factory=list)
    data: str | None = None
    regime: str | None = None
    seed: int | None = None
    derived_from: str | None = None  # a derived run (intruder mitigation): its source
    identity_version: int | None = None  # learnforget.config.IDENTITY_VERSION; None: 1 (before it)
    OMIT_IF_NONE = ("derived_from", "identity_version")


@dataclass(kw_only=True)
class TrainInfo(Section):
    """How it trains (written at the start) and how far it got (at the end)."""

    trainable_params: int | None = None
    total_params: int | None = None
    trainable_pct: float | None = None
    device: str | None = None
    precision: str | None = None
    precision_policy: dict[str, Any] = field(default_factory=dict)
    activation_checkpointing: bool = False
    ranks: int = 1
    distributed: str | None = None  # ddp | fsdp; None: one process
    total_steps: int | None = None
    checkpoint_steps: dict[Any, str] = field(default_factory=dict)  # step -> label
    cooldown_mode: str | None = None  # "branches" only
    budgets: dict[Any, str] | None = None  # cooldown branches: budget step -> label
    branch_points: dict[Any, str] | None = None  # cooldown branches: branch step -> label
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # deviations from the config, resumes
    quantisation: dict[str, Any] | None = None  # qlora: error of the quantised base
    steps_done: int | None = None
    tokens_seen: int | None = None
    data_position: int | None = None  # sequences read by all ranks
    wall_time_s: float | None = None
    cpu_time_s: float | None = None  # the training process's CPU seconds, over resumes
    peak_mem_mb: float | None = None
    checkpoints: list[str] | None = None  # labels saved so far
    OMIT_IF_NONE = ("cooldown_mode", "budgets", "branch_points", "quantisation", "steps_done",
                    "tokens_seen", "data_position", "wall_time_s", "cpu_time_s", "peak_mem_mb",
                    "checkpoints")


@dataclass(kw_only=True)
class MetaInfo(Section):
    """Where and with what it ran."""

    versions: dict[str, str | None] = field(default_factory=dict)
    git: dict[str, Any] = field(default_factory=dict)
    python: str | None = None
    platform: str | None = None
    host: str | None = None
    cuda: bool | None = None
    device_name: str | None = None
    cpu: dict[str, Any] | None = None  # model, bf16 flags, torch's kernel ISA (see cpu_info)
    torch_threads: int | None = None
    slurm_job_id: str | None = None
    OMIT_IF_NONE = ("cpu",)


STATUSES = ("running", "finished", "failed", "interrupted")


@dataclass
class RunRecord:
    """run.json: the run's status and its sections."""

    status: str
    run: RunInfo
    train: TrainInfo
    meta: MetaInfo
    cooldown: dict[str, Any] | None = None  # cooldown branches (train.cooldown)
    intruder_mitigation: dict[str, Any] | None = None  # a derived run's mitigation settings
    schema_version: int = SCHEMA_VERSION

    @property
    def config_hash(self) -> str | None:
        return self.run.config_hash

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": self.schema_version, "status": self.status,
                               "run": self.run.to_dict(), "config_hash": self.config_hash,
                               "train": self.train.to_dict(), "meta": self.meta.to_dict()}
        for key in ("cooldown", "intruder_mitigation"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: Path | str = "run.json") -> RunRecord:
        version = d.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ConfigError(f"{source} has schema_version {version!r}, newer than this "
                              f"learnforget reads ({SCHEMA_VERSION}): update learnforget")
        run = RunInfo.from_dict(d.get("run"))
        if run.config_hash is None:  # version 1 kept the hash at the top level only
            run.config_hash = d.get("config_hash")
        return cls(status=str(d.get("status", "unknown")), run=run,
                   train=TrainInfo.from_dict(d.get("train")), meta=MetaInfo.from_dict(d.get("meta")),
                   cooldown=d.get("cooldown"), intruder_mitigation=d.get("intruder_mitigation"))


PACKAGES = ("learnforget", "torch", "transformers", "peft", "bitsandbytes", "accelerate",
            "hydra-core", "wandb", "lm_eval", "datasets", "numpy")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict[str, Any]:
    """The harness's git commit (and whether its tree had uncommitted changes)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip() != ""
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU a run computed on: its model name, its bf16 instruction sets and the ISA torch's
    CPU kernels dispatch to. bf16 results differ between CPUs (the same code, torch and data
    gave bit-identical weights on one VM and different ones on another), so run.json keeps it.
    `cpuinfo`: the text of /proc/cpuinfo (read when None; empty off Linux)."""
    import torch

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name") or platform.processor() or None,
            "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def meta_info() -> MetaInfo:
    import torch

    cpu = cpu_info()
    return MetaInfo(
        versions=package_versions(), git=git_commit(), python=platform.python_version(),
        platform=platform.platform(), host=socket.gethostname(), cuda=torch.cuda.is_available(),
        device_name=(torch.cuda.get_device_name(0) if torch.cuda.is_available()
                     else cpu["model"]),
        cpu=cpu, torch_threads=torch.get_num_threads(),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"))


# ----------------------------------------------------------------------------- the folder

class RunFolder:
    """One run's folder: every path in it, its record and its lock."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def _at(self, key: str, **fill: str) -> Path:
        rel = LAYOUT[key][0].rstrip("/")
        for name, value in fill.items():
            rel = rel.replace(f"<{name}>", value)
        return self.path / rel

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def runs_root(self) -> Path:
        """The runs root this folder sits in (<root>/<experiment>/<run name>)."""
        return self.path.parents[1]

    @property
    def base_root(self) -> Path:
        """<runs root>/_base: the base-model results every run under the root shares."""
        return self.runs_root / BASE

    # the folder's files (LAYOUT), each a Path
    config = property(lambda self: self._at("config"))
    record_path = property(lambda self: self._at("record"))
    log = property(lambda self: self._at("log"))
    job = property(lambda self: self._at("job"))
    lock_path = property(lambda self: self._at("lock"))
    tokenizer = property(lambda self: self._at("tokenizer"))
    metrics = property(lambda self: self._at("metrics"))
    resume = property(lambda self: self._at("resume"))
    train_dir = property(lambda self: self._at("resume").parent)
    checkpoints_dir = property(lambda self: self._at("checkpoint", label="x").parent)
    eval_dir = property(lambda self: self._at("eval_summary", suite="x").parent)
    eval_tasks = property(lambda self: self._at("eval_tasks"))
    wandb = property(lambda self: self._at("wandb"))
    spectra_dir = property(lambda self: self._at("spectra", label="x").parent)
    intruders_dir = property(lambda self: self._at("intruders", label="x").parent)

    def checkpoint(self, label: str) -> Path:
        return self._at("checkpoint", label=label)

    def eval_result(self, label: str) -> Path:
        return self._at("eval_result", label=label)

    def eval_summary(self, suite: str) -> Path:
        return self._at("eval_summary", suite=suite)

    def eval_summaries(self, suite: str | None = None) -> list[Path]:
        return sorted(self.eval_dir.glob(self.eval_summary(suite or "*").name))

    def spectra(self, label: str) -> Path:
        return self._at("spectra", label=label)

    def intruders(self, label: str) -> Path:
        return self._at("intruders", label=label)

    def branch(self, label: str) -> RunFolder:
        return RunFolder(self._at("branch", label=label))

    # -- checkpoints
    def checkpoint_dirs(self) -> list[Path]:
        """Saved checkpoints (a folder with its manifest), in step order."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir()
                 if not p.name.startswith(".") and (p / MANIFEST).exists()]
        return sorted(found, key=lambda p: ((read_json(p / MANIFEST) or {}).get("step", 0),
                                            p.name))

    def checkpoint_labels(self) -> list[str]:
        """Labels of the saved checkpoints, sorted by name."""
        return sorted(p.name for p in self.checkpoint_dirs())

    def manifest(self, label: str) -> dict[str, Any] | None:
        return read_json(self.checkpoint(label) / MANIFEST)

    def manifests(self) -> dict[str, dict[str, Any]]:
        return {p.name: read_json(p / MANIFEST) or {} for p in self.checkpoint_dirs()}

    # -- run.json
    def read_record(self) -> RunRecord | None:
        """The typed run.json, or None when the run has none yet (a cut-short file is a
        ConfigError naming it)."""
        d = read_json(self.record_path)
        return None if d is None else RunRecord.from_dict(d, self.record_path)

    def write_record(self, record: RunRecord) -> None:
        atomic_write_json(self.record_path, record.to_dict())

    def finished(self, config_hash: str | None = None) -> bool:
        """The run finished (with this config hash, when given)."""
        rec = self.read_record()
        return bool(rec) and rec.finished and config_hash in (None, rec.config_hash)

    def check_same_run(self, config_hash: str) -> None:
        """Refuse to reuse a folder that holds a different run (e.g. a hand-set run_name)."""
        rec = self.read_record()
        if rec and rec.config_hash not in (None, config_hash):
            raise ConfigError(
                f"run folder {self.path} holds a different run (config hash "
                f"{str(rec.config_hash)[:12]} vs {config_hash[:12]}): choose another run_name "
                "or experiment_name")

    # -- job.json
    def read_job(self) -> dict[str, Any]:
        return read_result(self.job) or {}

    def write_job(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.job, record)

    def locked(self) -> bool:
        """True while another process holds the run's lock (trains it right now)."""
        return is_locked(self.lock_path)


class RunLock:
    """An exclusive, non-blocking lock on a run folder: one process trains a run at a time.

    An flock the OS releases when the process dies, so a killed run never leaves a stale lock;
    on file systems whose flock does not exclude across nodes (learnforget.locks: Lustre
    noflock/localflock, NFS local_lock) a lock file with a heartbeat, taken over when stale or
    when its holder was this SLURM job before a requeue. `note` says which, when not flock.
    """

    def __init__(self, folder: RunFolder | Path):
        folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
        self.path = folder.lock_path
        self._lock: Lock | None = None
        self.note = ""

    def acquire(self) -> bool:
        lock = try_lock(self.path)
        if lock is None:
            return False
        if lock.fd is not None:
            os.ftruncate(lock.fd, 0)
            os.write(lock.fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        else:
            self.note = (f"run lock: {lock.file.path.name}, a lock file with a heartbeat, not "
                         f"flock ({lock.reason})")
            print(f"learnforget: {self.note}", flush=True)
        self._lock = lock
        return True

    def release(self) -> None:
        if self._lock is not None:
            unlock(self._lock)
            self._lock = None


def readme_section() -> str:
    """The layout and run.json's sections as docs/run-folder.md's block shows them (a test
    checks that the page holds exactly this text)."""
    lines = ["```", "<run folder>/"]
    for path, what in LAYOUT.values():
        lines.append(textwrap.fill(what, 92, initial_indent=f"  {path:<26} ",
                                   subsequent_indent=" " * 29))
    lines += ["", f"run.json (schema_version {SCHEMA_VERSION}; config_hash also at the top level):", "  status".ljust(28) +
              " " + " | ".join(STATUSES)]
    for key, cls in (("run", RunInfo), ("train", TrainInfo), ("meta", MetaInfo)):
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        lines.append(textwrap.fill(f"{cls.__name__}: {cls.__doc__.strip()}", 92,
                                   initial_indent=f"  {key:<26} ", subsequent_indent=" " * 29))
        row = "    "
        for n in names:
            if len(row) + len(n) + 2 > 92:
                lines.append(row.rstrip())
                row = "    "
            row += n + ", "
        lines.append(row.rstrip(", "))
    lines += ["  cooldown".ljust(28) + " train.cooldown_mode=branches: each budget's branch",
              "  intruder_mitigation".ljust(28) + " a derived run: the mitigation settings",
              "```"]
    return "\n".join(lines) + "\n"
