"""The dry run's per-GPU fit check (learnforget.train.gpu_fit): the FSDP arithmetic by hand, a full
7B job that does not fit one GPU (with the change that makes it fit), and every paper study
fitting one node of 8 x 80 GB as shipped."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from learnforget.studies.command import sweep_cli
from learnforget.train import gpu_fit

GIB = 2**30


def _report(**kw):
    base = dict(weights_bytes=80 * GIB, grads_bytes=40 * GIB, optimizer_bytes=80 * GIB,
                activations_bytes=10 * GIB, logits_bytes=1 * GIB, recompute_bytes=0.0,
                workspace_bytes=0.0,
                compute="bf16", root_params=100_000_000, layer_params=200_000_000,
                trainable=10, peak_bytes=80 * GIB + 80 * GIB + 12 * GIB + 40 * GIB)
    base.update(kw)
    return SimpleNamespace(**base)


def test_per_gpu_bytes_by_hand():
    r = _report()
    act = 10 * GIB + 2 * GIB  # activations + 2 x logits
    # FSDP on 8 ranks: (80 + 40 + 80) / 8 GiB of states, root + 2 layers gathered in bf16
    # (2 bytes), one layer's fp32 gradients (4 bytes), + activations
    gathered = (100_000_000 + 2 * 200_000_000) * 2 + 200_000_000 * 4
    assert gpu_fit.per_gpu_bytes(r, "fsdp", 8) == pytest.approx(200 * GIB / 8 + gathered + act)
    assert gpu_fit.per_gpu_bytes(r, "single", 1) == r.peak_bytes
    assert gpu_fit.per_gpu_bytes(r, "ddp", 8) == r.peak_bytes + 40 * GIB  # gradient buckets
    ck = _report(recompute_bytes=3 * GIB)  # checkpointing: one layer rebuilt > 2 x logits
    assert gpu_fit.per_gpu_bytes(ck, "fsdp", 8) == pytest.approx(
        200 * GIB / 8 + gathered + 13 * GIB)
    ws = _report(recompute_bytes=3 * GIB, workspace_bytes=2 * GIB)  # SAID's rebuilt weight
    assert gpu_fit.per_gpu_bytes(ws, "fsdp", 8) == pytest.approx(
        200 * GIB / 8 + gathered + 15 * GIB)


def test_gpu_plan_from_profile():
    p = gpu_fit.gpu_plan({"nodes": 2, "tasks_per_node": 8, "gpu_mem_gb": 80})
    assert (p.ranks, p.gpu_mem_gib) == (16, 80.0)
    assert gpu_fit.gpu_plan({"gpus_per_node": 1}).ranks == 1


def test_full_7b_on_one_gpu_does_not_fit_and_says_how(tmp_path, capsys):
    rc = sweep_cli(["code_cpt", "--dry-run", "--cluster", "default", "method=full",
                    f"paths.runs_dir={tmp_path}"])
    assert rc == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("1  full ") and "NO" in x)
    assert "single" in line and "fits with FSDP on 8 GPUs" in line
    assert "WARNING: the study's global batch is 192 sequences, but 1 job(s) would step on 24" \
        in out
    assert "fit: 0 of 1 job(s) fit; 1 do NOT" in out


def test_full_7b_as_shipped_fits_the_8_gpu_node(tmp_path, capsys):
    assert sweep_cli(["code_cpt", "--dry-run", "method=full", f"paths.runs_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "clusters/llama7b_full_fsdp.yaml: 8 GPU(s) per job, 80 GB each" in out
    row = next(x for x in out.splitlines() if x.strip().startswith("1  full ") and "fsdp" in x)
    assert row.split()[4] == "192" and row.split()[5] == "bf16/fp32" and row.rstrip().endswith("yes")
    assert "fit: 1 of 1 job(s) fit" in out


def test_unknown_gpu_memory_is_said(tmp_path, capsys):
    prof = tmp_path / "p.yaml"
    prof.write_text("gpus_per_node: 1\n")
    assert sweep_cli(["code_cpt", "--dry-run", "--cluster", str(prof), "method=full",
                      f"paths.runs_dir={tmp_path}"]) == 0
    assert "gpu_mem_gb not set" in capsys.readouterr().out
    prof.write_text("gpu_mem_gb: -3\n")
    from learnforget.errors import ConfigError

    with pytest.raises(ConfigError, match="gpu_mem_gb must be a positive number"):
        sweep_cli(["code_cpt", "--dry-run", "--cluster", str(prof), f"paths.runs_dir={tmp_path}"])


@pytest.mark.slow
@pytest.mark.parametrize("study", ["code_cpt", "math_cpt", "code_ift", "math_ift", "lr_search"])
def test_every_paper_study_fits_one_8x80_node_as_shipped(study, tmp_path, capsys):
    assert sweep_cli([study, "--dry-run", f"paths.runs_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    n = int(out.split("fit: ")[1].split(" of ")[1].split()[0])
    assert f"fit: {n} of {n} job(s) fit" in out and "WARNING" not in out


def test_report_key_ignores_the_lr_and_seed_not_what_the_estimate_reads():
    """One cached parameter report serves every job of an LR grid (lr_search: 6 LRs per
    method); what changes the estimate gets its own (see test_ablation_studies for the count
    of reports in a dry run)."""
    from learnforget.config import compose
    from learnforget.train.params import _report_key as key

    base = ["model=llama2_7b", "method=lora", "train.precision=bf16"]
    assert key(compose([*base, "train.lr=1e-4"]), True, "cuda") == key(
        compose([*base, "train.lr=3e-4", "seed=3"]), True, "cuda")
    assert key(compose(base), True, "cuda") == key(compose(base), True, "cpu")  # same policy
    assert key(compose(base), True, "cuda") != key(compose(base), False, "cuda")
    for other in (["train.precision=fp32"], ["train.seq_len=512"], ["method.r=8"],
                  ["train.activation_checkpointing=true"], ["train.optimizer=lion"],
                  ["method.dropout=0.1"], ["model.dtype=float32"]):
        assert key(compose([*base, *other]), True, "cuda") != key(compose(base), True, "cuda"), other
