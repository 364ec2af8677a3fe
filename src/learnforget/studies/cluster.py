"""SLURM cluster profiles (clusters/*.yaml beside conf/ and sweeps/; not Hydra configs) and the checks before a submission: the
profile's keys, `sbatch --test-only` on the script submitit would submit, and a refused
submission as one error line."""

from __future__ import annotations

import dataclasses
import difflib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from learnforget.config import conf_dir
from learnforget.errors import ConfigError


def _slurm_conf_cls():
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    return SlurmQueueConf


def cluster_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(_slurm_conf_cls())
            if f.name not in ("_target_", "submitit_folder", "name")]


def clusters_dir() -> Path:
    """The shipped profiles: clusters/ of the source checkout (beside conf/ and sweeps/)."""
    return conf_dir().parent / "clusters"


def cluster_profile_path(explicit: str | os.PathLike | None = None,
                         study_default: str | None = None) -> Path:
    """--cluster FILE, else $LEARNFORGET_CLUSTER, else the study's `cluster` (a profile its jobs
    need, e.g. 8 GPUs for FSDP), else ~/.config/learnforget/cluster.yaml, else
    clusters/default.yaml."""
    if not explicit and not os.environ.get("LEARNFORGET_CLUSTER") and study_default:
        explicit = study_default
    if explicit:
        p = Path(explicit).expanduser()
        named = clusters_dir() / f"{explicit}.yaml"  # --cluster fsdp_8gpu
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
    return user if user.exists() else clusters_dir() / "default.yaml"


OWN_PROFILE_KEYS = ("gpu_mem_gb", "prepare", "eval")  # learnforget's own: never passed to submitit
STAGE_PROFILES = ("prepare", "eval")  # sub-mappings: the CPU preparation job, the 1-GPU eval jobs
GPU_KEYS = ("gpus_per_node", "gpus_per_task", "gres", "mem_per_gpu", "cpus_per_gpu")
EVAL_MIN_MEM_GB = 32


def profile_resources(path: str | os.PathLike) -> dict[str, Any]:
    """The GPUs a profile gives one job (nodes, tasks_per_node, gpu_mem_gb), for fit checks."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    load_cluster_profile(path)  # the same checks as a launch
    return {k: raw.get(k) for k in ("nodes", "tasks_per_node", "gpus_per_node", "gpu_mem_gb",
                                    "mem_gb")}


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
    for which in STAGE_PROFILES:
        sub = own.get(which)
        if sub is None:
            continue
        allowed = cluster_keys() + (["gpu_mem_gb"] if which == "eval" else [])
        bad = [k for k in sub] if isinstance(sub, dict) else None
        if bad is None or any(k not in allowed for k in bad):
            wrong = "not a mapping" if bad is None else \
                f"unknown key {next(k for k in bad if k not in allowed)!r}"
            raise ConfigError(f"cluster profile {path}: {which}: {wrong}; expected a mapping of "
                              f"the profile's keys ({', '.join(allowed)})")
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


def stage_profile(path: str | os.PathLike, which: str,
                  settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SLURM settings of a sweep's `prepare` job (CPU) or `eval` jobs (one GPU each), made
    from the profile (with the command line's hydra.launcher.* settings):

    - both: nodes=1, tasks_per_node=1; then the profile's `prepare:` / `eval:` mapping on top;
    - prepare: no GPU keys at all (gpus_per_node, gres, ... removed: no GPU is requested);
    - eval: one GPU (gpus_per_node=1 where the profile asks for GPUs, none where it does not,
      e.g. a CPU stand-in) and mem_gb = the profile's mem_gb / its GPUs per node, at least
      EVAL_MIN_MEM_GB (never more than the profile's). The result keeps gpu_mem_gb (learnforget's
      own key, for the eval batch check); pass it through cluster_settings before submitit."""
    import math

    raw = yaml.safe_load(Path(path).read_text()) or {}
    base = {**load_cluster_profile(path), **(settings or {})}
    out = {k: v for k, v in base.items() if k not in GPU_KEYS}
    out.update(nodes=1, tasks_per_node=1)
    if which == "eval":
        gpus = base.get("gpus_per_node")
        if gpus is not None or base.get("gres"):
            out["gpus_per_node"] = 1
        n = gpus if isinstance(gpus, int) and gpus > 1 else 1
        if base.get("mem_gb") and n > 1:
            out["mem_gb"] = min(base["mem_gb"], max(EVAL_MIN_MEM_GB, math.ceil(base["mem_gb"] / n)))
        out["gpu_mem_gb"] = raw.get("gpu_mem_gb")
    elif which != "prepare":
        raise ConfigError(f"stage profile {which!r}: expected one of {', '.join(STAGE_PROFILES)}")
    out.update(raw.get(which) or {})
    return out


def cluster_settings(profile: dict[str, Any]) -> dict[str, Any]:
    """The profile without learnforget's own keys: what submitit gets."""
    return {k: v for k, v in profile.items() if k not in OWN_PROFILE_KEYS}


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def slurm_executor(profile: dict[str, Any], folder: Path, name: str = "learnforget",
                   dependency: str | None = None):
    """A submitit AutoExecutor for SLURM with the profile on SlurmQueueConf's defaults, its keys
    mapped to submitit's as hydra-submitit-launcher maps them; `dependency` becomes sbatch
    --dependency (e.g. afterok:123, aftercorr:124)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    profile = cluster_settings(profile)
    if dependency:
        profile = {**profile, "additional_parameters": {
            **(profile.get("additional_parameters") or {}), "dependency": dependency}}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(_slurm_conf_cls()), profile)
    except Exception as e:  # omegaconf: a hydra.launcher.* override of an unknown key or type
        raise ConfigError(f"SLURM launcher settings: {_one_line(e)}") from e
    params = {k: v for k, v in OmegaConf.to_container(merged, resolve=False).items()
              if k not in ("_target_", "submitit_folder")}
    params["name"] = name
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
    return executor


def sbatch_script(profile: dict[str, Any], n_jobs: int, folder: Path) -> str:
    """The sbatch script submitit would submit for a job array of `n_jobs` with this profile."""
    from learnforget.private_api import submission_script

    return submission_script(slurm_executor(profile, folder, "learnforget-preflight"), n_jobs)


def slurm_preflight(profile: dict[str, Any], where: Path, n_jobs: int) -> str:
    """Ask SLURM, before anything is written or submitted, whether it accepts the sweep's job
    array as submitit will submit it: `sbatch --test-only` on the same script (partition,
    account, qos, time, memory, GPUs, array...). A refusal is one ConfigError quoting sbatch.
    Returns sbatch's answer (when and where the jobs would start)."""
    import subprocess
    import tempfile

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
