"""Run under torchrun (2 gloo ranks): train.setup() for one or more configs, then each rank
writes what it holds (its parameters as it trains them: FSDP's local shards, DDP's whole
tensors; every buffer; tied weights; the random-number states) and its peak host RSS: before
loading, right after load_model, and at the end of setup (weights on the device, for FSDP
sharded).

    torchrun --nproc_per_node=2 tests/rank0_load_probe.py OUT_DIR CONFIG_JSON

CONFIG_JSON: {"name": [override, ...], ...}; writes OUT_DIR/<name>-rank<r>.pt. Also a driver
for the measurement with a large random Llama (see tests/test_rank0_load.py):

    python tests/rank0_load_probe.py measure --layers 18 --hidden 1024
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().cpu().clone()


def probe(out: Path, configs: dict[str, list[str]]) -> None:
    from learnforget.config import compose
    from learnforget.train import distributed, loop

    d = distributed.init()
    marks: dict[str, float] = {}
    real_load = loop.load_model

    def load_model(*args, **kwargs):
        result = real_load(*args, **kwargs)
        marks["after_load"] = rss_mib()
        return result

    loop.load_model = load_model
    for name, overrides in configs.items():
        distributed.barrier(d)
        marks.clear()
        marks["before"] = rss_mib()
        s = loop.setup(compose(overrides))
        marks["after_setup"] = rss_mib()
        model = s.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        state = {
            "params": {n: local(p) for n, p in model.named_parameters()},
            "buffers": {n: local(b) for n, b in model.named_buffers()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "tied": base.get_output_embeddings().weight is base.get_input_embeddings().weight,
            "training": model.training,
            "rng": (torch.get_rng_state(), random.getstate()[1], np.random.get_state()[1]),
            "rss_mib": dict(marks), "notes": s.notes, "strategy": s.strategy,
        }
        torch.save(state, out / f"{name}-rank{d.rank}.pt")
        del s, model, base
    distributed.barrier(d)


def measure(layers: int, hidden: int, workdir: Path) -> None:
    """Build a random Llama of `layers` x `hidden` (fp32, save_pretrained) and load it on 2 gloo
    ranks with each way (every_rank, rank0) and strategy (fsdp, ddp), one process pair per
    setting: peak RSS per rank, side by side."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from learnforget.assets.models import tiny_tokenizer

    model_dir = workdir / "model"
    cfg = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      max_position_embeddings=512, tie_word_embeddings=False)
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)  # saved in bf16, like Llama-2's fp16 checkpoint: fp32 masters convert
        AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(model_dir)
        tiny_tokenizer(512).save_pretrained(model_dir)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    print(f"model: {n / 1e6:.0f}M parameters, saved in bf16, loaded as fp32 masters: "
          f"{n * 4 / 2**20:,.0f} MiB ({model_dir})")
    print(f"{'strategy':<8} {'load_weights':<12} {'rank':>4} {'before MiB':>10} "
          f"{'after load':>10} {'after setup':>11} {'growth':>8} {'/model':>7}")
    for strategy in ("fsdp", "ddp"):
        for how in ("every_rank", "rank0"):
            out = workdir / f"{strategy}-{how}"
            out.mkdir(parents=True, exist_ok=True)
            overrides = common_overrides(workdir, model_dir) + [
                f"train.distributed.strategy={strategy}", f"train.distributed.load_weights={how}"]
            run_probe(out, {"m": overrides}, port=_free_port())
            total = 0.0
            for r in (0, 1):
                m = torch.load(out / f"m-rank{r}.pt", weights_only=False)["rss_mib"]
                growth = m["after_setup"] - m["before"]
                total += m["after_setup"]
                print(f"{strategy:<8} {how:<12} {r:>4} {m['before']:>10,.0f} "
                      f"{m['after_load']:>10,.0f} {m['after_setup']:>11,.0f} {growth:>8,.0f} "
                      f"{growth / (n * 4 / 2**20):>7.2f}")
            print(f"{strategy:<8} {how:<12} {'sum':>4} {'':>10} {'':>10} {total:>11,.0f}")


def common_overrides(workdir: Path, model_dir: Path) -> list[str]:
    return [f"paths.runs_dir={workdir / 'runs'}", f"paths.cache_dir={workdir / 'cache'}",
            "model=tiny_llama", "model.source=hub", f"model.hub_id={model_dir}",
            "method=full", "data=stdlib_code", "data.max_docs=4", "data.heldout_docs=1",
            "train.seq_len=64", "train.batch_size=1", "train.grad_accum=1",
            "train.precision=fp32", "train.num_threads=1"]


def _free_port() -> int:
    """A port the OS reports free (test workers run in parallel: no fixed port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_probe(out: Path, configs: dict[str, list[str]], port: int) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", f"--master_port={port}",
                        __file__, str(out), json.dumps(configs)],
                       env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"probe failed: {r.stderr[-3000:]}")


if __name__ == "__main__":
    if sys.argv[1] == "measure":
        import argparse

        ap = argparse.ArgumentParser()
        ap.add_argument("measure")
        ap.add_argument("--layers", type=int, default=18)
        ap.add_argument("--hidden", type=int, default=1024)
        ap.add_argument("--workdir", type=Path, default=Path("/tmp/rank0_load_measure"))
        a = ap.parse_args()
        measure(a.layers, a.hidden, a.workdir)
    else:
        probe(Path(sys.argv[1]), json.loads(sys.argv[2]))
