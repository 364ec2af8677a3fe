"""One gradient reduction per optimizer step, the loss normalised by the step's loss tokens,
and per-rank dropout seeds (learnforget.train.step).

Equal updates: one optimizer step of full finetuning on the same 4 IFT sequences (their loss
tokens differ: prompts are masked and responses differ in length) cut as 1 x 4 and 4 x 1
micro-batches in one process, and as 2 x 1 and 1 x 2 per rank on 2 gloo ranks (DDP and FSDP2),
with plain SGD (the update is -lr x the gradient, so a wrongly weighted token shows) and fp32
compute. Tolerance: the largest difference of any weight's update is at most 1e-5 of the
largest update (the cuts differ only in the order of floating-point sums; measured in the
report of the change). The normalisation before (train.loss_norm=micro_batch_mean) fails the
same comparison by far more than that.

Collectives: grad_accum=4 on 2 gloo ranks: DDP's comm hook (which reduces a bucket of
gradients) runs only in the backward pass of the last micro-batch, and in all four with
train.distributed.grad_sync=micro_batch; FSDP2 reduce-scatters once per shard unit (2 layers +
root) per step with grad_sync=step (by default, auto, once per micro-batch: gradients stay
sharded); the step's scalars (loss, tokens) take one all-reduce."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FAST, OFFLINE_DATA, TORCHRUN, free_port, multi_rank_env, step_losses
from crash_hook import crash_after
from omegaconf import open_dict

from learnforget.config import config_hash, run_dir, run_name
from learnforget.data.packing import IGNORE_INDEX
from learnforget.errors import ConfigError
from learnforget.train.loop import setup
from learnforget.train.plan import loss_tokens, micro_batch
from learnforget.train.step import prepends_virtual_tokens, rank_seed

PROBE = Path(__file__).parent / "fixtures" / "grad_sync_probe.py"
TOL = 1e-5  # of the largest update (see the module docstring)
LR = 1.0
IFT = ["method=full", "train.precision=fp32", "train.grad_clip=null", "train.num_threads=1",
       "train.checkpoints.unit=steps", "train.checkpoints.at=[1]", "train.heldout_batches=0"]
ALL_METHODS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf/method").glob("[!_]*.yaml"))


def _overrides(tmp_path: Path, cache: Path, extra: list[str]) -> list[str]:
    """IFT's overrides on local_instruct (or on the data set of a first `data=...`), then extra."""
    data = "local_instruct"
    if extra[:1] and extra[0].startswith("data="):
        data, extra = extra[0].removeprefix("data="), extra[1:]
    return [f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={cache}", *FAST,
            f"data={data}", *OFFLINE_DATA[data], *IFT, *extra]


def _probe(tmp_path: Path, cache: Path, cases: dict[str, list[str]]) -> dict:
    """The probe's results for these cases on 2 gloo ranks (torchrun)."""
    spec, out = tmp_path / "spec.json", tmp_path / "out.pt"
    spec.write_text(json.dumps({"lr": LR, "cases": {k: _overrides(tmp_path, cache, v)
                                                    for k, v in cases.items()}}))
    r = subprocess.run([str(TORCHRUN), "--nproc_per_node=2", f"--master_port={free_port()}", str(PROBE),
                        str(spec), str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _in_process(tmp_path: Path, cache: Path, cases: dict[str, list[str]]) -> dict:
    """The probe's results for these cases in this process (one rank)."""
    spec = importlib.util.spec_from_file_location("grad_sync_probe", PROBE)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return {k: probe.run_case(_overrides(tmp_path, cache, v), LR) for k, v in cases.items()}


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference between two updates, relative to the largest update of a."""
    assert a.keys() == b.keys()
    top = max(float(v.abs().max()) for v in a.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / top


def test_the_first_step_has_sequences_with_different_loss_tokens(make_cfg):
    s = setup(make_cfg(*IFT, "train.batch_size=4", data="local_instruct"))
    b = micro_batch(s.data, s.plan, s.cfg.train, 0, s.cfg.seed, s.tokenizer.pad_token_id)
    per_row = (b["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
    assert len(set(per_row)) > 1, per_row  # else every cut would weigh tokens alike
    assert loss_tokens(s.data, s.plan, s.cfg.train, 1, s.cfg.seed) == sum(per_row)


def test_loss_tokens_count_every_rank_and_micro_batch(make_cfg):
    """train.plan.loss_tokens against the collated micro-batches of both ranks (steps 1-3)."""
    s = setup(make_cfg(*IFT, "train.batch_size=2", "train.grad_accum=2", data="local_instruct"))
    t = s.cfg.train
    for step in (1, 2, 3):
        expected = 0
        for k in range(2):
            for rank in range(2):
                b = micro_batch(s.data, s.plan, t, (step - 1) * 2 + k, s.cfg.seed, 0, rank, 2)
                expected += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        assert loss_tokens(s.data, s.plan, t, step, s.cfg.seed, world=2) == expected


@pytest.mark.parametrize(("method", "data", "model"), [
    *[(m, "local_instruct", "tiny_llama") for m in ALL_METHODS],
    # packed CPT blocks: every first label is a target, which only prompt tuning scores
    ("full", "stdlib_code", "tiny_llama"), ("prompt", "stdlib_code", "tiny_llama"),
    ("prefix", "stdlib_code", "tiny_llama"), ("lora", "local_instruct", "tiny_gpt2")])
def test_the_count_is_the_models_own_for_every_method(make_cfg, method, data, model):
    """The model's loss divided by our count (num_items_in_batch) equals its own mean over the
    tokens it scores, through every method's wrapper (prompt tuning prepends virtual tokens
    labelled -100, so its first label becomes a target)."""
    s = setup(make_cfg(*IFT[1:], f"method={method}", f"model={model}", "method.r=4",
                       "method.num_virtual_tokens=4", "method.dropout=0.0", "train.batch_size=4",
                       data=data))
    s.model.eval()
    n = loss_tokens(s.data, s.plan, s.cfg.train, 1, s.cfg.seed,
                    prepends=prepends_virtual_tokens(s.model))
    b = micro_batch(s.data, s.plan, s.cfg.train, 0, s.cfg.seed, s.tokenizer.pad_token_id)
    with torch.no_grad():
        mean = s.model(**b).loss
        summed = s.model(**b, num_items_in_batch=n).loss
    torch.testing.assert_close(summed, mean, rtol=1e-6, atol=0)
    assert prepends_virtual_tokens(s.model) == (method == "prompt")
    if data == "stdlib_code":  # the count with and without the first label differs here
        assert loss_tokens(s.data, s.plan, s.cfg.train, 1, s.cfg.seed, prepends=True) == n + (
            0 if method == "prompt" else 4)


def test_new_keys_are_checked_and_keep_cpt_run_names(make_cfg):
    with pytest.raises(ConfigError, match="train.loss_norm 'mean' is unknown"):
        setup(make_cfg("train.loss_norm=mean"))
    with pytest.raises(ConfigError, match="train.distributed.grad_sync 'never' is unknown"):
        setup(make_cfg("train.distributed.grad_sync=never"))
    # CPT: both normalisations are one loss on packed blocks: one run name
    assert run_name(make_cfg("train.loss_norm=tokens")) == \
        run_name(make_cfg("train.loss_norm=micro_batch_mean"))
    # IFT: the new normalisation is a new run; the old one keeps the names of earlier runs
    tokens = make_cfg("train.loss_norm=tokens", data="local_instruct")
    old = make_cfg("train.loss_norm=micro_batch_mean", data="local_instruct")
    assert config_hash(tokens) != config_hash(old)
    with_key_removed = make_cfg("train.loss_norm=micro_batch_mean", data="local_instruct")
    with open_dict(with_key_removed):
        del with_key_removed.train["loss_norm"]  # a config from before the key existed
    assert config_hash(with_key_removed) == config_hash(old)


def test_an_ift_run_names_its_folder_from_before_the_token_loss(make_cfg, capsys):
    cfg = make_cfg("train.checkpoints.at=[1]", data="local_instruct")
    assert not any("micro_batch_mean to continue" in n for n in setup(cfg).notes)
    old = run_dir(make_cfg("train.checkpoints.at=[1]", "train.loss_norm=micro_batch_mean",
                           data="local_instruct"))
    old.mkdir(parents=True)  # an IFT run trained before train.loss_norm existed
    notes = setup(cfg).notes
    assert any(old.name in n and "train.loss_norm=micro_batch_mean to continue" in n
               for n in notes), notes
    assert old.name in capsys.readouterr().out
    assert run_dir(cfg) != old


def test_rank_seeds_differ_by_rank_and_step_and_repeat():
    seeds = {(step, rank): rank_seed(7, step, rank) for step in (1, 2, 3) for rank in range(8)}
    assert len(set(seeds.values())) == len(seeds)
    assert rank_seed(7, 2, 3) == seeds[(2, 3)] and rank_seed(8, 2, 3) != seeds[(2, 3)]


def test_one_step_is_the_same_however_the_batch_is_cut_in_one_process(tmp_path, cache_dir):
    cases = {"1x4": ["train.batch_size=4", "train.grad_accum=1"],
             "4x1": ["train.batch_size=1", "train.grad_accum=4"],
             "4x1_old": ["train.batch_size=1", "train.grad_accum=4",
                         "train.loss_norm=micro_batch_mean"]}
    r = _in_process(tmp_path, cache_dir, cases)
    ref = r["1x4"]
    assert _gap(ref["delta"], r["4x1"]["delta"]) <= TOL
    assert abs(r["4x1"]["loss"] - ref["loss"]) <= 1e-6 * ref["loss"]
    assert r["4x1"]["tokens"] == ref["tokens"]
    assert _gap(ref["delta"], r["4x1_old"]["delta"]) > 100 * TOL  # the old loss fails
    assert any("train.loss_norm=tokens" in n for n in ref["notes"])


@pytest.mark.slow  # ~40-70 s: two torchrun ranks set up nine runs
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_two_ranks_reduce_once_per_step_and_update_as_one_process(tmp_path, cache_dir):
    one = _in_process(tmp_path, cache_dir, {"1x4": ["train.batch_size=4", "train.grad_accum=1"]})["1x4"]
    cases = {"ddp_2x1": ["train.batch_size=2", "train.grad_accum=1"],
             "ddp_1x2": ["train.batch_size=1", "train.grad_accum=2"],
             "ddp_1x2_old": ["train.batch_size=1", "train.grad_accum=2",
                             "train.loss_norm=micro_batch_mean"],
             "fsdp_1x2": ["train.batch_size=1", "train.grad_accum=2",
                          "train.distributed.strategy=fsdp"],
             "ddp_accum4": ["train.batch_size=1", "train.grad_accum=4"],
             "ddp_accum4_every": ["train.batch_size=1", "train.grad_accum=4",
                                  "train.distributed.grad_sync=micro_batch"],
             "fsdp_accum4": ["train.batch_size=1", "train.grad_accum=4",
                             "train.distributed.strategy=fsdp", "train.distributed.grad_sync=step"],
             "fsdp_accum4_auto": ["train.batch_size=1", "train.grad_accum=4",
                                  "train.distributed.strategy=fsdp"],
             "lora_dropout": ["data=stdlib_code", "method=lora", "method.r=4",
                              "method.dropout=0.5", "train.batch_size=1"]}
    r = _probe(tmp_path, cache_dir, cases)
    for case in ("ddp_2x1", "ddp_1x2", "fsdp_1x2"):
        assert _gap(one["delta"], r[case]["delta"]) <= TOL, case
        assert abs(r[case]["loss"] - one["loss"]) <= 1e-6 * one["loss"], case
        assert r[case]["tokens"] == one["tokens"], case
    assert _gap(one["delta"], r["ddp_1x2_old"]["delta"]) > 100 * TOL  # the old loss fails

    # DDP: gradients reduced in the backward of the last micro-batch only; one all-reduce for
    # the step's scalars (the other all_reduce calls are the comm hook's, one per bucket)
    assert r["ddp_accum4"]["synced_micro_batches"] == [4]
    assert r["ddp_accum4"]["all_reduce_calls"] - r["ddp_accum4"]["hook_calls"] == 1
    every = r["ddp_accum4_every"]
    assert every["synced_micro_batches"] == [1, 2, 3, 4]  # the counter sees every reduction
    assert every["all_reduce_calls"] - every["hook_calls"] == 1
    # FSDP2 with grad_sync=step: one reduce-scatter per shard unit (2 decoder layers + the root)
    # per step; by default (auto) one per unit and micro-batch, keeping gradients sharded
    assert r["fsdp_accum4"]["reduce_scatter_calls"] == 3
    assert r["fsdp_accum4_auto"]["reduce_scatter_calls"] == 12
    assert r["fsdp_accum4"]["all_reduce_calls"] == 1
    assert _gap(r["fsdp_accum4_auto"]["delta"], r["fsdp_accum4"]["delta"]) <= TOL
    assert _gap(r["ddp_accum4"]["delta"], r["fsdp_accum4"]["delta"]) <= TOL

    # per-rank dropout masks, one adapter init on every rank (CPT blocks: equal shapes)
    lora = r["lora_dropout"]
    assert lora["init_equal"] and not lora["masks_equal"], lora["mask_shape"]
    assert any("reseeded at every step per rank" in n for n in lora["notes"])


@pytest.mark.slow  # ~60-90 s: three 2-rank runs
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_two_rank_lora_with_dropout_resumes_exactly(tmp_path, cache_dir):
    """Per-rank dropout seeds are a function of (seed, step, rank): a 2-rank LoRA run (dropout
    0.5) killed after step 3 and resumed from step 2 ends with the losses and adapter weights of
    the uninterrupted run, bit for bit (gloo on the CPU is deterministic)."""
    from safetensors.torch import load_file

    env = multi_rank_env(tmp_path, cache_dir)
    lora = [*FAST, "method=lora", "method.r=4", "method.dropout=0.5", "train.checkpoints.at=[2,4]",
            "train.num_threads=1", "data.max_docs=8", "data.heldout_docs=2", "train.lr=1e-2",
            "train.precision=fp32", "train.batch_size=2", "train.grad_accum=2"]

    def launch(experiment: str, crash: int | None = None) -> subprocess.CompletedProcess:
        run_env, hook = crash_after(crash, env)
        return subprocess.run(
            [str(TORCHRUN), "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
             "learnforget.cli", "train", *lora, f"experiment_name={experiment}", *hook],
            env=run_env, capture_output=True, text=True, timeout=300)

    straight = launch("straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert launch("killed", crash=3).returncode != 0
    resumed = launch("killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "from step 2" in resumed.stdout, resumed.stdout
    a = next((tmp_path / "runs/straight").iterdir())
    b = next((tmp_path / "runs/killed").iterdir())
    assert step_losses(a) == step_losses(b)
    wa = load_file(a / "checkpoints/step-000004/adapter_model.safetensors")
    wb = load_file(b / "checkpoints/step-000004/adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_fit_check_counts_fsdp_gradients_held_between_micro_batches(make_cfg):
    """With grad_sync=step FSDP2 keeps every layer's unsharded gradient (reduce dtype) until the
    last micro-batch: the per-GPU estimate adds all of them instead of one layer's (why FSDP's
    default, auto, reduce-scatters every micro-batch)."""
    from types import SimpleNamespace

    from learnforget.train import gpu_fit

    gib = 2**30
    rep = SimpleNamespace(weights_bytes=28 * gib, grads_bytes=28 * gib, optimizer_bytes=56 * gib,
                          activations_bytes=4 * gib, logits_bytes=gib, recompute_bytes=0.0, workspace_bytes=0.0,
                          compute="bf16", root_params=300_000_000, layer_params=200_000_000)
    once = gpu_fit.per_gpu_bytes(rep, "fsdp", 8, accumulates=True)
    every = gpu_fit.per_gpu_bytes(rep, "fsdp", 8, accumulates=False)
    assert once - every == 28 * gib - 200_000_000 * 4
    step = "train.distributed.grad_sync=step"
    assert gpu_fit.accumulates_unsharded(make_cfg("train.grad_accum=4", step))
    assert not gpu_fit.accumulates_unsharded(make_cfg("train.grad_accum=1", step))
    assert not gpu_fit.accumulates_unsharded(make_cfg("train.grad_accum=4"))  # auto: per micro-batch
