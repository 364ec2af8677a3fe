"""GPU-hours of a study's jobs, from data (a study's `cost:` mapping), not code:

    cost:
      tokens_per_gpu_s: 5000          # training throughput of full finetuning on one GPU
      epoch_tokens: 103000000         # tokens per epoch (checkpoints in epochs), or per data set:
                                      #   {magicoder_evol: 72970000, metamathqa: 103000000}
      eval_gpu_hours: 1.0             # scoring one checkpoint
      speed:                          # throughput factors (a number: every job); each entry
        - {match: {method: lora}, factor: 0.85}      # whose match holds multiplies the speed
        - {match: {train.precision: fp32}, factor: 0.15}

    GPU-hours per job = tokens / (tokens_per_gpu_s x speed) / 3600 + checkpoints x eval_gpu_hours

`tokens` is what the job trains: its last token budget, its last step x batch x sequence
length, or its last epoch x epoch_tokens; with `train.cooldown_mode=branches` the plateau run
plus every budget's cooldown branch ((1 - c) x max(B) + c x sum(B)). A `match` key is a config
key of the composed job (`method`, `data`, `model` match the group's name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from learnforget.errors import ConfigError
from learnforget.studies.values import fmt, matches

COST_KEYS = ("tokens_per_gpu_s", "epoch_tokens", "eval_gpu_hours", "speed")


@dataclass(frozen=True)
class Cost:
    tokens_per_gpu_s: float
    eval_gpu_hours: float = 0.0
    epoch_tokens: float | dict[str, float] | None = None
    speed: list[tuple[dict[str, Any], float]] = field(default_factory=list)  # (match, factor)

    def describe(self) -> str:
        """One line for the dry run."""
        parts = [f"tokens / ({self.tokens_per_gpu_s:g} tokens/s x speed) / 3600 + checkpoints x "
                 f"{self.eval_gpu_hours:g} h"]
        if isinstance(self.epoch_tokens, dict):
            parts.append("epoch_tokens " + ", ".join(f"{k}={v:,.0f}"
                                                     for k, v in self.epoch_tokens.items()))
        elif self.epoch_tokens is not None:
            parts.append(f"epoch_tokens={self.epoch_tokens:,.0f}")
        parts += [f"speed x{f:g}" + (f" where {' '.join(f'{k}={fmt(v)}' for k, v in m.items())}"
                                     if m else "") for m, f in self.speed]
        return "; ".join(parts)


def _number(value: Any, what: str, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            value <= 0 if positive else value < 0):
        raise ConfigError(f"{what} must be a {'positive' if positive else 'non-negative'} "
                          f"number, got {value!r}")
    return float(value)


def parse_cost(raw: Any, where: str) -> Cost:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of {', '.join(COST_KEYS)}")
    unknown = [k for k in raw if k not in COST_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (expected: {', '.join(COST_KEYS)})")
    if "tokens_per_gpu_s" not in raw:
        raise ConfigError(f"{where}: tokens_per_gpu_s is required (training tokens per second "
                          "on one GPU)")
    epoch = raw.get("epoch_tokens")
    if isinstance(epoch, dict):
        epoch = {str(k): _number(v, f"{where}: epoch_tokens.{k}") for k, v in epoch.items()}
    elif epoch is not None:
        epoch = _number(epoch, f"{where}: epoch_tokens")
    speed = raw.get("speed", [])
    if not isinstance(speed, list):
        speed = [{"factor": speed}]
    factors = []
    for i, s in enumerate(speed):
        if not (isinstance(s, dict) and set(s) <= {"match", "factor"} and "factor" in s
                and isinstance(s.get("match", {}), dict)):
            raise ConfigError(f"{where}: speed[{i}] must be {{match: {{key: value}}, factor: "
                              f"number}}, got {s!r}")
        factors.append((dict(s.get("match") or {}), _number(s["factor"], f"{where}: speed[{i}]")))
    return Cost(_number(raw["tokens_per_gpu_s"], f"{where}: tokens_per_gpu_s"),
                _number(raw.get("eval_gpu_hours", 0.0), f"{where}: eval_gpu_hours", False),
                epoch, factors)


def config_value(cfg: DictConfig, key: str) -> Any:
    """A composed config's value for a study key: `method` -> the method's name."""
    value = OmegaConf.select(cfg, key, default=None)
    if isinstance(value, DictConfig):
        value = value.get("name")
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def trained_tokens(cfg: DictConfig, epoch_tokens: float | None) -> float | None:
    """Tokens the job trains (to its last checkpoint, with every cooldown branch)."""
    t = cfg.train
    at = [float(a) for a in t.checkpoints.at]
    unit = t.checkpoints.unit
    if unit == "tokens":
        tokens = max(at)
    elif unit == "steps":
        tokens = max(at) * int(t.batch_size) * int(t.grad_accum) * int(t.seq_len)
    else:
        tokens = None if epoch_tokens is None else max(at) * epoch_tokens
    if tokens is not None and str(t.get("cooldown_mode", "single")) == "branches":
        c = float(t.cooldown_ratio)  # the plateau run to the last branch point, then each branch
        tokens = (1 - c) * tokens + c * tokens / max(at) * sum(at)
    return tokens


def gpu_hours(cost: Cost | float, cfg: DictConfig) -> float:
    """The job's GPU-hours under the study's cost model (a number: the same for every job):
    training GPU-hours + evaluation GPU-hours (split_hours)."""
    return sum(split_hours(cost, cfg))


def split_hours(cost: Cost | float, cfg: DictConfig) -> tuple[float, float]:
    """(training GPU-hours, evaluation GPU-hours) of the job. Training: tokens at
    tokens_per_gpu_s on each GPU, so wall-hours x the GPUs its job holds; evaluation:
    checkpoints x eval_gpu_hours on one GPU (its own 1-GPU job on SLURM). A plain number per
    job counts as training."""
    if not isinstance(cost, Cost):
        return float(cost), 0.0
    epoch = cost.epoch_tokens
    if isinstance(epoch, dict):
        data = str(cfg.data.name)
        if data not in epoch:
            raise ConfigError(f"cost.epoch_tokens has no entry for data={data} (it has: "
                              f"{', '.join(epoch)})")
        epoch = epoch[data]
    tokens = trained_tokens(cfg, epoch)
    if tokens is None:
        raise ConfigError("cost.epoch_tokens is needed: the job's checkpoints are in epochs")
    speed = 1.0
    for match, factor in cost.speed:
        if matches({k: config_value(cfg, k) for k in match}, match):
            speed *= factor
    return (tokens / (cost.tokens_per_gpu_s * speed) / 3600,
            len(cfg.train.checkpoints.at) * cost.eval_gpu_hours)
