"""Metric loggers: the disk record is always on; W&B mirrors it when `logger=wandb`."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from learnforget.files import disk_full_guard
from learnforget.runfolder import RunFolder

# a secret's name: an API key, secret, password or credential, or a name whose last word is
# "token" (HF_TOKEN, hf_token, token); counts of tokens (max_new_tokens, num_virtual_tokens,
# expected_tokens, shard_tokens) are not secrets and stay in config.yaml, which stages reload
SECRET = re.compile(r"(api[_-]?key|secret|password|passwd|credential|(^|[_.-])token$)", re.I)


def scrub(obj: Any) -> Any:
    """Drop values whose key looks like a secret, recursively."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET.search(str(k)) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


class MetricLogger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def finish(self, status: str) -> None: ...


class DiskLogger:
    """Appends one JSON object per line; every line is flushed as it is written."""

    def __init__(self, path: Path, *, truncate_after_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= truncate_after_step]
            path.write_text("".join(line + "\n" for line in keep))
        elif truncate_after_step is None and path.exists():
            path.unlink()
        self._f = path.open("a")

    def log(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=float) + "\n"
        with disk_full_guard(self.path, len(line.encode())):  # a line cut short: see _step_of
            self._f.write(line)
            self._f.flush()

    def summary(self, values: dict[str, Any]) -> None:
        pass  # run.json holds the summary

    def finish(self, status: str) -> None:
        self._f.close()


def _step_of(line: str) -> int | None:
    """The step of one metrics line; None for a blank line or one cut short by a kill."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


WANDB_MODES = ("online", "offline", "disabled")
ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
             "disabled": "disabled"}


def wandb_mode(requested: str) -> str:
    """The W&B mode a run uses. `WANDB_MODE=offline` (or disabled) in the environment always
    wins: a compute node without internet sets it, whether or not a key is set. Otherwise auto
    means WANDB_MODE when set, else online with WANDB_API_KEY, else offline."""
    if requested != "auto" and requested not in WANDB_MODES:
        from learnforget.errors import ConfigError

        raise ConfigError(f"logger.mode {requested!r} is unknown (expected auto, offline, online, "
                          "disabled)")
    env = ENV_MODES.get(os.environ.get("WANDB_MODE", "").strip().lower())
    if env in ("offline", "disabled"):
        return env
    if requested == "auto":
        return env or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return requested


def redact(text: str) -> str:
    """`text` with the values of secret-looking environment variables (W&B key, HF token)
    replaced: W&B error messages can quote the key."""
    for name, value in os.environ.items():
        if value and len(value) >= 8 and SECRET.search(name):
            text = text.replace(value, "<redacted>")
    return text


def mirror_off(what: str, e: BaseException) -> None:
    """One warning line: the W&B mirror is off, and why; the disk record goes on."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    print(f"learnforget: warning: W&B mirror off ({what}: {type(e).__name__}: "
          f"{redact(first)}); the run folder keeps the full record", file=sys.stderr, flush=True)


class WandbLogger:
    """A W&B run mirroring the disk record: group = experiment, job_type = stage."""

    def __init__(self, logger_cfg: DictConfig, *, run_dir: Path, run_name: str, group: str,
                 job_type: str, config: dict[str, Any], tags: list[str], x_axis: str = "step"):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        wandb_dir = RunFolder(run_dir).wandb
        os.environ.setdefault("WANDB_CACHE_DIR", str(wandb_dir / ".cache"))
        os.environ.setdefault("WANDB_DATA_DIR", str(wandb_dir / ".data"))
        self.mode = wandb_mode(logger_cfg.mode)
        self.run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            group=group,
            job_type=job_type,
            name=run_name,
            id=_wandb_id(run_name, job_type),
            resume="allow",
            dir=str(run_dir),
            config=scrub(config),
            tags=[str(t)[:64] for t in tags + list(logger_cfg.tags)],
            mode=self.mode,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self.run.define_metric("*", step_metric=x_axis)
        self.x_axis = x_axis

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in scrub(values).items():
            self.run.summary[k] = v

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


def _wandb_id(run_name: str, job_type: str) -> str:
    import hashlib

    return hashlib.sha1(f"{run_name}|{job_type}".encode()).hexdigest()[:16]


class Loggers:
    """Fan-out to every logger. The first `required` (the disk record) raise on failure; a
    failing mirror (W&B) warns once and is dropped, so it never breaks a run."""

    def __init__(self, loggers: list[MetricLogger], *, required: int = 1):
        self.loggers = list(loggers)
        self.required = min(required, len(self.loggers))

    def _each(self, method: str, *args: Any) -> None:
        for i, lg in enumerate(list(self.loggers)):
            try:
                getattr(lg, method)(*args)
            except Exception as e:
                if i < self.required:
                    raise
                self.loggers.remove(lg)
                mirror_off(f"{type(lg).__name__}.{method} failed", e)

    def log(self, record: dict[str, Any]) -> None:
        self._each("log", record)

    def summary(self, values: dict[str, Any]) -> None:
        self._each("summary", values)

    def finish(self, status: str) -> None:
        self._each("finish", status)


def open_wandb(logger_cfg: DictConfig, **kwargs: Any) -> WandbLogger | None:
    """A W&B run, or None (with a one-line warning) when W&B cannot start: a bad key, no
    network, the server down, a broken install. Keyword arguments as for WandbLogger."""
    if logger_cfg.name != "wandb" or wandb_mode(str(logger_cfg.mode)) == "disabled":
        return None
    from learnforget.console import quiet_wandb

    quiet_wandb()
    try:
        return WandbLogger(logger_cfg, **kwargs)
    except Exception as e:
        mirror_off(f"wandb.init failed for {kwargs.get('job_type', 'this stage')}", e)
        return None


def mirror_loggers(logger_cfg: DictConfig | None, **kwargs: Any) -> Loggers:
    """Only the W&B mirror (the stage writes its own files): empty when off or failed."""
    lg = open_wandb(logger_cfg, **kwargs) if logger_cfg is not None else None
    return Loggers([lg] if lg is not None else [], required=0)


def make_loggers(cfg: DictConfig, *, run_dir: Path, run_name: str, stage: str,
                 config: dict[str, Any], tags: list[str], metrics_path: Path,
                 resume_step: int | None) -> Loggers:
    loggers: list[MetricLogger] = [DiskLogger(metrics_path, truncate_after_step=resume_step)]
    mirror = open_wandb(cfg.logger, run_dir=run_dir, run_name=run_name,
                        group=str(cfg.experiment_name), job_type=stage, config=config, tags=tags,
                        x_axis="tokens" if stage != "train" else "step")
    return Loggers(loggers + ([mirror] if mirror is not None else []))
