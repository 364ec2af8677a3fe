"""Composing and checking run configs; what identifies a run (its name and hash)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from learnforget.errors import ConfigError
from learnforget.methods.registry import effective_method, method_summary, validate_method

OPTIMIZERS = ("adamw", "lion", "lionw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "paged_lion")
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
PRECISIONS = ("auto", "fp32", "bf16")   # = learnforget.train.precision.PRECISIONS (no torch here)
MASTER_WEIGHTS = ("fp32", "model_dtype")
CHECKPOINT_UNITS = ("tokens", "epochs", "steps")
REGIMES = ("cpt", "ift")
DATA_FORMATS = ("memory", "shards")   # = learnforget.data.shards.FORMATS
LOGGER_MODES = ("auto", "offline", "online", "disabled")
STRATEGIES = ("ddp", "fsdp")   # = learnforget.train.distributed.STRATEGIES (not imported: no torch here)
COOLDOWN_MODES = ("single", "branches")   # learnforget.train.cooldown
LOSS_NORMS = ("tokens", "micro_batch_mean")   # learnforget.train.step
GRAD_SYNCS = ("auto", "step", "micro_batch")   # learnforget.train.step
PLATEAU_SCHEDULES = ("inverse_sqrt", "constant")  # schedules whose plateau ignores the length


def conf_dir() -> Path:
    """The Hydra config folder: $LEARNFORGET_CONF_DIR, else conf/ of the source checkout."""
    env = os.environ.get("LEARNFORGET_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "config.yaml").exists():
        raise ConfigError(
            f"config folder not found at {path} (install learnforget from its source checkout "
            "with `pip install -e .`, or set LEARNFORGET_CONF_DIR)")
    return path


def hydra_error_message(e: Exception) -> str:
    """One line naming the bad value and what was expected, from a Hydra composition error."""
    text = str(e)
    m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if isinstance(e, MissingConfigException) and m:
        group, value = m.groups()
        opts = re.findall(r"^\t(\w[\w.-]*)$", text.split("Config search path")[0], re.M)
        opts = [o for o in opts if not o.startswith("_")]
        return f"unknown {group} {value!r} (expected one of: {', '.join(opts)})"
    m = re.search(r"Could not override '([^']+)'", text)
    if m and "not in struct" in str(e.__cause__):
        return (f"unknown config key {m.group(1)!r} (see `learnforget train --cfg job` for the "
                f"keys; to add a new key on purpose use +{m.group(1)}=...)")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ else ""
    return first + cause


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the run config as `learnforget train` would (for tests, params, sweeps)."""
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides))
    except (ConfigCompositionException, MissingConfigException, OmegaConfBaseException) as e:
        raise ConfigError(hydra_error_message(e)) from e


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: DictConfig) -> None:
    """Check every value a run reads before anything is loaded or written."""
    _require(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool),
             f"seed must be an integer, got {cfg.seed!r}")
    validate_method(cfg.method)
    t = cfg.train
    _require(t.optimizer in OPTIMIZERS,
             f"train.optimizer {t.optimizer!r} is unknown (expected one of: {', '.join(OPTIMIZERS)})")
    _require(t.schedule in SCHEDULES,
             f"train.schedule {t.schedule!r} is unknown (expected one of: {', '.join(SCHEDULES)})")
    _require(t.precision in PRECISIONS,
             f"train.precision {t.precision!r} is unknown (expected one of: {', '.join(PRECISIONS)})")
    master = t.get("master_weights", "fp32")
    _require(master in MASTER_WEIGHTS,
             f"train.master_weights {master!r} is unknown (expected one of: "
             f"{', '.join(MASTER_WEIGHTS)})")
    ckpt = t.get("activation_checkpointing", False)
    _require(isinstance(ckpt, bool),
             f"train.activation_checkpointing must be true or false, got {ckpt!r}")
    _require(isinstance(t.lr, (int, float)) and t.lr > 0, f"train.lr must be > 0, got {t.lr!r}")
    for key in ("batch_size", "grad_accum", "seq_len"):
        v = t[key]
        _require(isinstance(v, int) and v > 0, f"train.{key} must be a positive integer, got {v!r}")
    _require(t.grad_clip is None or t.grad_clip > 0,
             f"train.grad_clip must be > 0 or null, got {t.grad_clip!r}")
    ck = t.checkpoints
    _require(ck.unit in CHECKPOINT_UNITS,
             f"train.checkpoints.unit {ck.unit!r} is unknown (expected one of: "
             f"{', '.join(CHECKPOINT_UNITS)})")
    at = list(ck.at)
    _require(len(at) > 0 and all(isinstance(a, (int, float)) and a > 0 for a in at),
             f"train.checkpoints.at must be a non-empty list of positive numbers, got {at!r}")
    _require(at == sorted(set(at)),
             f"train.checkpoints.at must be strictly increasing, got {at!r}")
    _check_cooldown(t)
    ad = t.get("attention_dropout")
    _require(ad is None or (isinstance(ad, (int, float)) and not isinstance(ad, bool)
                            and 0 <= ad < 1),
             f"train.attention_dropout must be null or a number in [0, 1), got {ad!r}")
    callbacks = t.get("callbacks") or []
    _require(OmegaConf.is_list(callbacks) or isinstance(callbacks, list),
             f"train.callbacks must be a list of import paths, got {callbacks!r}")
    _require(all(isinstance(c, str) and c for c in callbacks),
             f"train.callbacks must be a list of import paths (package.module.function), got "
             f"{list(callbacks)!r}")
    strategy = (t.get("distributed") or {}).get("strategy", "ddp")
    _require(strategy in STRATEGIES,
             f"train.distributed.strategy {strategy!r} is unknown (expected one of: "
             f"{', '.join(STRATEGIES)})")
    norm, sync = t.get("loss_norm", "tokens"), (t.get("distributed") or {}).get("grad_sync", "auto")
    _require(norm in LOSS_NORMS,
             f"train.loss_norm {norm!r} is unknown (expected one of: {', '.join(LOSS_NORMS)})")
    _require(sync in GRAD_SYNCS, f"train.distributed.grad_sync {sync!r} is unknown (expected "
             f"one of: {', '.join(GRAD_SYNCS)})")
    mode = (cfg.get("logger") or {}).get("mode", "auto")
    _require(mode in LOGGER_MODES,
             f"logger.mode {mode!r} is unknown (expected one of: {', '.join(LOGGER_MODES)})")
    _require(cfg.data.regime in REGIMES,
             f"data.regime {cfg.data.regime!r} is unknown (expected one of: {', '.join(REGIMES)})")
    fmt = cfg.data.get("format", "memory")
    _require(fmt in DATA_FORMATS,
             f"data.format {fmt!r} is unknown (expected one of: {', '.join(DATA_FORMATS)})")
    _require(fmt != "shards" or cfg.data.regime == "cpt",
             f"data.format=shards is for continued pretraining (data.regime=cpt), not "
             f"data.regime={cfg.data.regime}: instruction sets use data.format=memory")


def cooldown_mode(t: Any) -> str:
    """train.cooldown_mode: single (one run per budget) or branches (learnforget.train.cooldown)."""
    mode = str(t.get("cooldown_mode", "single") or "single")
    if mode not in COOLDOWN_MODES:
        raise ConfigError(f"train.cooldown_mode={mode!r} is unknown (expected one of: "
                          f"{', '.join(COOLDOWN_MODES)})")
    return mode


def _check_cooldown(t: Any) -> None:
    """A branches run needs a schedule with a length-free plateau and a cooldown share."""
    if cooldown_mode(t) != "branches":
        return
    if t.schedule not in PLATEAU_SCHEDULES:
        raise ConfigError(f"train.cooldown_mode=branches needs train.schedule inverse_sqrt or "
                          f"constant (a plateau that does not depend on the run's length), not "
                          f"{t.schedule!r}")
    if not 0 < float(t.cooldown_ratio) < 1:
        raise ConfigError(f"train.cooldown_mode=branches needs 0 < train.cooldown_ratio < 1, got "
                          f"{t.cooldown_ratio!r}")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


# ----------------------------------------------------------------------------- run identity
#
# A run's name and hash come from the keys below and nothing else: a key that is not listed is
# not hashed, so a new key (train.compile, a fused optimizer, a logging switch) leaves every run
# name as it was. The method's part is the method's own (learnforget.methods.registry.USES).
#
# Adding a key that does not change what a run computes: add it to NOT_IDENTITY (no name changes).
# Adding a key that DOES change what a run computes:
#   1. add it to IDENTITY_KEYS (a key only some data sets or models have: just this);
#   2. if its default reproduces the old computation, also add that default to IDENTITY_DEFAULTS:
#      at the default the key is left out of the hash, so existing names stay; only runs that
#      set another value get new names. No version bump.
#   3. otherwise (the default itself computes something new, or a listed key changes meaning)
#      bump IDENTITY_VERSION and add a learnforget.identity.MIGRATIONS entry saying whether old
#      folders are renamed (same computation, new name) or which runs must be redone.
# test_run_names.py (test suite) pins the names of every study job (demo and paper studies).

IDENTITY_VERSION = 1   # recorded in run.json (run.identity_version); see learnforget.identity

IDENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "model": ("name", "source", "hub_id", "package", "gguf_file", "dtype", "arch", "init_from"),
    "data": ("name", "regime", "source", "path", "hub_id", "hub_config", "hub_split", "streaming",
             "text_field", "prompt_field", "response_field", "prompt_template", "max_docs",
             "heldout_docs", "format", "generator", "facts_values", "facts_offset", "train_chars"),
    "train": ("optimizer", "lr", "weight_decay", "betas", "eps", "schedule", "warmup_ratio",
              "warmup_steps", "min_lr_ratio", "cooldown_ratio", "cooldown_mode", "batch_size",
              "grad_accum", "loss_norm", "seq_len", "grad_clip", "precision", "master_weights",
              "checkpoints", "attention_dropout"),
}
# The keys of conf/model, conf/data and conf/train that do not change what a run computes. Not
# used by the hash (an unlisted key is never hashed); test_run_names.py checks that every key of
# those config files is in IDENTITY_KEYS or here, so that a new key (a data set's generator
# settings, say) gets a decision instead of silently sharing a run folder with other data.
NOT_IDENTITY: dict[str, tuple[str, ...]] = {
    "model": (),
    "data": ("shard_tokens",       # how token shards are cut
             "expected_tokens"),   # what the paper reports about the corpus
    "train": ("log_every", "num_threads", "heldout_batches", "heldout_every", "resume_every_min",
              "distributed",                # how the ranks share the work
              "activation_checkpointing",   # recomputed activations, the same gradients
              "callbacks",                  # hooks after each step (learnforget.train.callbacks)
              "speed"),                     # how fast a step runs (learnforget.train.speed): rounding at most
}

# Listed keys left out at the value that reproduces the runs from before the key existed.
IDENTITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"init_from": None},
    "data": {"format": "memory", "train_chars": None, "facts_offset": 0},
    "train": {"cooldown_mode": "single", "attention_dropout": None},
}


def _identity_section(section: str, node: Any) -> dict[str, Any]:
    values = _plain(node) or {}
    out = {k: values[k] for k in IDENTITY_KEYS[section] if k in values}
    for key, default in IDENTITY_DEFAULTS.get(section, {}).items():
        if key in out and out[key] == default:
            out.pop(key)
    return out


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """What a run computes: the IDENTITY_KEYS of model, data and train, the effective method,
    the seed. Nothing else (logger, paths, experiment name, keys the method ignores, keys not
    listed) changes a run's name or hash."""
    data = _identity_section("data", cfg.data)
    train = _identity_section("train", cfg.train)
    if train.get("loss_norm") == "micro_batch_mean" or data.get("regime") == "cpt":
        # micro_batch_mean: the loss before train.loss_norm (older runs keep their hash); cpt:
        # packed blocks, every micro-batch has as many loss tokens, so both are one loss. An
        # IFT run with loss_norm=tokens is a different computation: a new name.
        train.pop("loss_norm", None)
    return {"model": _identity_section("model", cfg.model), "method": effective_method(cfg.method),
            "data": data, "train": train, "seed": cfg.seed}


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(run_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_name(cfg: DictConfig) -> str:
    """`<model>-<method summary>-<data>-s<seed>-<hash6>` unless run_name is set."""
    if cfg.get("run_name"):
        return str(cfg.run_name)
    return (f"{cfg.model.name}-{method_summary(cfg.method)}-{cfg.data.name}-s{cfg.seed}"
            f"-{config_hash(cfg)[:6]}")


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.runs_dir).resolve() / str(cfg.experiment_name) / run_name(cfg)
