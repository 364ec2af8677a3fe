"""private_api.py is the one module that uses private library APIs: each use is checked here,
so that a library release that changes one fails loudly."""
from __future__ import annotations

import os

import torch


def test_the_private_api_adapter_still_works(tmp_path, monkeypatch):
    """private_api.py is the one use of private library APIs (submitit's sbatch
    script without submitting): this fails loudly when a submitit release changes them."""
    from learnforget.private_api import submission_script
    from learnforget.studies.cluster import slurm_executor

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    executor = slurm_executor({"partition": "gpu", "timeout_min": 600, "cpus_per_task": 4},
                              tmp_path / "logs")
    script = submission_script(executor, 3)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=600", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --array=0-2%", "#SBATCH --job-name=learnforget"):
        assert line in script, (line, script)
    assert "srun " in script and script.rstrip().endswith(" true")  # the command it was given
    assert "#SBATCH --array" not in submission_script(slurm_executor({}, tmp_path / "l"), 1)


def test_the_requeue_signal_is_the_one_submitit_handles():
    """The other private call: the signal submitit's SLURM handler requeues a job on (USR2
    unless SUBMITIT_USR_SIG, read when submitit is imported, names another)."""
    import signal

    from learnforget.private_api import requeue_signal

    want = getattr(signal, "SIG" + os.environ.get("SUBMITIT_USR_SIG", "USR2"))
    assert requeue_signal() == want


def test_memory_tracker_follows_a_model_with_frozen_parameters():
    """torch's private MemTracker, with a frozen parameter marked done: one training step's peak
    holds at least the weights, their gradient and the optimizer state (by hand: bytes)."""
    from learnforget.private_api import memory_tracker

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    mt = memory_tracker(model, opt)
    with mt:
        model(torch.randn(4, 64)).square().sum().backward()
        opt.step()
    peak = mt.get_tracker_snapshot("peak")
    dev = next(iter(peak))
    total = peak[dev]["Total"]
    trainable = (64 + 64 * 8 + 8) * 4  # bias of layer 0 + layer 1, float32
    assert total >= 64 * 64 * 4 + trainable * 4  # weights (frozen too) + grads + 2 Adam states


def test_peft_loftq_pieces_match_numpy_and_the_saved_weights(tmp_path):
    """peft's private LoftQ SVD step against numpy's truncated SVD, and its safetensors reader
    against the weights a tiny Llama saved: fails when a peft release changes either."""
    import numpy as np
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from learnforget.private_api import low_rank_decomposition, safetensor_loader

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    left, right = low_rank_decomposition(w.float(), 5)
    assert tuple(left.shape) == (24, 5) and tuple(right.shape) == (5, 40)
    u, s, vt = np.linalg.svd(w.numpy(), full_matrices=False)
    best = (u[:, :5] * s[:5]) @ vt[:5]
    np.testing.assert_allclose((left @ right).double().numpy(), best, atol=1e-4)

    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4))
    base.save_pretrained(tmp_path)  # model.safetensors
    saved = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    got = safetensor_loader(model, str(tmp_path)).get_tensor(
        "model.layers.0.self_attn.q_proj.weight")
    torch.testing.assert_close(got, saved)
