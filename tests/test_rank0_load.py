"""One copy of the base model in host RAM per job (learnforget.train.rank0_load): on 2 gloo
ranks, rank 0 reads the weights and rank 1 builds the model on the meta device and receives
them after sharding. Every rank must end setup() with bitwise the same parameters, buffers
(the rotary inv_freq, which a meta init leaves empty), tied weights and random-number state as
when each rank loads the model itself (train.distributed.load_weights=every_rank, the earlier
behaviour); and rank 1's host memory must not grow by a model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, TORCHRUN, free_port

from learnforget.config import compose
from learnforget.errors import ConfigError
from learnforget.train import rank0_load
from learnforget.train.distributed import Dist

sys.path.insert(0, str(Path(__file__).parent))
from rank0_load_probe import common_overrides, run_probe  # noqa: E402

needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")

CASES = {
    "full_ddp_tied": ["method=full", "train.distributed.strategy=ddp",
                      "model.arch.tie_word_embeddings=true"],
    "full_fsdp_tied": ["method=full", "train.distributed.strategy=fsdp",
                       "model.arch.tie_word_embeddings=true"],
    "lora_ddp": ["method=lora", "method.dropout=0.1", "train.distributed.strategy=ddp"],
    "lora_fsdp_bf16": ["method=lora", "train.distributed.strategy=fsdp", "train.precision=bf16"],
    "adapter_ddp": ["method=adapter"],  # its layers are built on the meta device: no RNG drawn
    "dora_ddp": ["method=dora"],  # its magnitudes are norms of the base weights
    "vera_ddp": ["method=vera"],  # shared random projections (buffers)
    "prefix_ddp": ["method=prefix"],
}


def _load(folder: Path, name: str, rank: int) -> dict:
    return torch.load(folder / f"{name}-rank{rank}.pt", weights_only=False)


@pytest.mark.slow  # ~90 s: two torchrun launches of 2 ranks, 8 setups each
@needs_torchrun
def test_rank0_weights_are_bitwise_the_per_rank_weights(tmp_path, cache_dir):
    base = [f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={cache_dir}", *FAST,
            "data=stdlib_code", "data.max_docs=4", "data.heldout_docs=1", "train.num_threads=1"]
    for how in ("every_rank", "rank0"):
        (tmp_path / how).mkdir()
        run_probe(tmp_path / how, {name: [*base, *o, f"train.distributed.load_weights={how}"]
                                   for name, o in CASES.items()}, port=free_port())
    for name in CASES:
        for rank in (0, 1):
            old, new = _load(tmp_path / "every_rank", name, rank), _load(tmp_path / "rank0", name,
                                                                          rank)
            for part in ("params", "buffers"):
                assert old[part].keys() == new[part].keys(), (name, rank, part)
                for key, t in old[part].items():
                    u = new[part][key]
                    assert t.dtype == u.dtype and t.shape == u.shape, (name, rank, key)
                    assert torch.equal(t.view(torch.uint8) if t.is_floating_point() else t,
                                       u.view(torch.uint8) if u.is_floating_point() else u), \
                        (name, rank, key)
            assert old["requires_grad"] == new["requires_grad"]
            assert old["tied"] == new["tied"] and old["training"] == new["training"]
            assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b))
                       for a, b in zip(old["rng"], new["rng"], strict=True)), (name, rank)
            assert any("received rank 0's weights" in n for n in new["notes"]), new["notes"]
            assert any("every rank read the base model" in n for n in old["notes"])
        # what makes the comparison meaningful: the buffers are real (not the zeros or garbage
        # of an empty tensor) and, for FSDP, the ranks hold different shards
        buffers = _load(tmp_path / "rank0", name, 1)["buffers"]
        inv = next(b for k, b in buffers.items() if k.endswith("rotary_emb.inv_freq"))
        assert inv[0] == 1.0 and 0 < inv[-1] < 1
    fsdp = [_load(tmp_path / "rank0", "full_fsdp_tied", r) for r in (0, 1)]
    assert fsdp[0]["strategy"] == "fsdp" and fsdp[0]["tied"] and fsdp[1]["tied"]
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(fsdp[0]["params"][key], fsdp[1]["params"][key])
    lora = [_load(tmp_path / "rank0", "lora_ddp", r)["params"] for r in (0, 1)]
    a = next(k for k in lora[0] if "lora_A" in k)
    assert lora[0][a].abs().sum() > 0 and torch.equal(lora[0][a], lora[1][a])


@pytest.mark.slow  # ~60 s: two torchrun launches of 2 ranks
@needs_torchrun
def test_rank1_host_memory_does_not_grow_by_a_model(tmp_path):
    """A random Llama of ~69M parameters (saved in bf16 like Llama-2's checkpoint, loaded as
    fp32 masters: ~265 MiB, well above the ~10-35 MiB that setup adds to a process's peak RSS
    anyway), loaded for full finetuning with FSDP on 2 gloo ranks. Every rank reading it grows
    rank 1's peak RSS by more than the model (measured 1.5x: the fp32 copy and the mapped bf16
    file); with rank 0 reading it, rank 1 grows by under 10% of the model while loading and by
    about its FSDP shard (half the model, on its "device", which is the CPU here) at the end of
    setup."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from learnforget.assets.models import tiny_tokenizer

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=2048, hidden_size=512, intermediate_size=2048, num_hidden_layers=16,
        num_attention_heads=8, max_position_embeddings=512))
    model_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    model.to(torch.bfloat16).save_pretrained(model_dir)  # like Llama-2's fp16 checkpoint
    tiny_tokenizer(512).save_pretrained(model_dir)
    del model
    growth = {}
    for how in ("every_rank", "rank0"):
        (tmp_path / how).mkdir()
        run_probe(tmp_path / how, {"m": [*common_overrides(tmp_path, model_dir),
                                         "train.distributed.strategy=fsdp",
                                         f"train.distributed.load_weights={how}"]}, port=free_port())
        m = torch.load(tmp_path / how / "m-rank1.pt", weights_only=False)["rss_mib"]
        growth[how] = (m["after_load"] - m["before"], m["after_setup"] - m["before"])
    assert growth["every_rank"][0] > 1.0 * model_mib, (growth, model_mib)
    assert growth["rank0"][0] < 0.1 * model_mib, (growth, model_mib)
    assert growth["rank0"][1] < 0.7 * model_mib, (growth, model_mib)  # its half, + setup's own


def test_which_runs_load_on_rank0_only():
    def cfg(*o):
        return compose(list(o))

    assert rank0_load.from_rank0(cfg("method=full"), 8)
    assert rank0_load.from_rank0(cfg("method=lora"), 8)
    assert not rank0_load.from_rank0(cfg("method=full"), 1)
    assert not rank0_load.from_rank0(cfg("method=qlora"), 8)
    assert not rank0_load.from_rank0(cfg("method=lora", "method.init=pissa"), 8)
    assert not rank0_load.from_rank0(cfg("method=lora", "method.init=eva"), 8)
    assert not rank0_load.from_rank0(cfg("method=full", "train.distributed.load_weights="
                                         "every_rank"), 8)
    assert "method=qlora" in rank0_load.note(cfg("method=qlora"), Dist(0, 8, 0))[0]
    assert rank0_load.note(cfg("method=full"), Dist()) == []
    with pytest.raises(ConfigError, match="load_weights 'rank_zero' is unknown"):
        rank0_load.from_rank0(cfg("train.distributed.load_weights=rank_zero"), 1)


# ------------------------------------------------------------------ the dry run's host RAM

LLAMA2_7B_PARAMS = 6_738_415_616  # Touvron et al. 2023 / the hub checkpoint's parameter count


def _host_lines(out: str) -> list[str]:
    block = out.split("\nhost RAM per node:")[1].split("\nfit: ")[0]
    return [x for x in block.splitlines()[1:] if x.strip()]


def test_dry_run_states_host_ram_per_node(tmp_path, capsys):
    from learnforget.studies.command import sweep_cli

    assert sweep_cli(["code_cpt", "--dry-run", "method=full,lora", "method.r=16",
                      f"paths.runs_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "against the profile's mem_gb (256 GB)" in out
    fp32 = LLAMA2_7B_PARAMS * 4 / 2**30  # fp32 masters: 25.1 GiB (27.0 GB)
    full, lora = _host_lines(out)
    assert full.split()[:4] == ["job", "1", "full", "fsdp"]
    assert f"{fp32:.1f} GiB: rank 0 reads" in full and f"8 x {fp32:.1f} = {8 * fp32:.1f} GiB" in full
    bf16 = LLAMA2_7B_PARAMS * 2 / 2**30  # LoRA's frozen base stays in model.dtype (bf16)
    assert f"{bf16:.1f} GiB: rank 0 reads" in lora and "ddp" in lora
    assert "WARNING" not in "\n".join(_host_lines(out))


def test_dry_run_warns_when_every_rank_reading_exceeds_mem_gb(tmp_path, capsys):
    from learnforget.studies.command import sweep_cli

    prof = tmp_path / "p.yaml"
    prof.write_text("nodes: 1\ntasks_per_node: 8\ngpus_per_node: 8\ngpu_mem_gb: 80\nmem_gb: 128\n")
    assert sweep_cli(["code_cpt", "--dry-run", "--cluster", str(prof), "method=full",
                      "train.distributed.strategy=fsdp", "train.distributed.load_weights=every_rank",
                      f"paths.runs_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    (line,) = _host_lines(out)[:1]
    fp32 = LLAMA2_7B_PARAMS * 4 / 2**30
    assert f"{8 * fp32:.1f} GiB: every rank reads the weights, 8 x {fp32:.1f} GiB" in line
    assert "(train.distributed.load_weights=every_rank)" in line and "exceeds mem_gb" in line
    assert "WARNING: 1 job(s) need more host RAM than the profile's mem_gb (128 GB)" in out
