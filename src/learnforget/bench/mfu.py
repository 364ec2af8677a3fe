"""`learnforget bench train`, MFU part: model FLOP/s of the harness against GEMM peaks measured in
the same run, beside a plain PyTorch loop a user would write.

Conventions (stated in the JSON under `convention`):
- N counts every parameter of the model (embeddings included: SmolLM2 ties its embedding to the
  LM head, whose matmul is real work). Attention's own score/value matmuls (12 L T d per token,
  forward and backward) are not counted, as in the usual 6N estimate.
- Full finetuning: 6N FLOPs per token (forward 2N, backward 4N).
- Adapter methods (LoRA): frozen weights take part in the forward (2) and in the gradient
  with respect to activations (2), but have no weight gradient: 4 N_frozen + 6 N_trainable
  per token ("adapter" convention). The "6N" convention (as if every weight were trained) is
  reported beside it, so that full and LoRA rates compare as tokens of the same model.
- Peak: the best of a few 2048 x 2048 x 2048 matmuls (2 n^3 FLOPs each) in bf16 and in fp32,
  measured in the same process just before the section. MFU = model FLOP/s / peak.
- On a shared machine the same figures per process CPU second (`*_mfu_cpu`: model FLOPs per CPU
  second of the loop against GEMM FLOPs per CPU second of the peak) do not count the time the
  process waited for a core; they still count cache and memory-bandwidth contention.

The plain loop (`plain_steps`) is what a user would write without the harness: the HF model
loaded by `from_pretrained` in float32, peft's `get_peft_model` with a `LoraConfig` of the same
rank, alpha, dropout and all linear layers, `torch.optim.AdamW` with torch's defaults for
everything but lr/betas/eps/weight decay, `clip_grad_norm_`, autocast in the compute dtype the
harness resolved (bf16 where the CPU has bf16 arithmetic, else fp32), on the same batches as the
harness's steps and the same seed. It shares no object with the harness's run.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch

from learnforget.bench.measure import fmt_spread

GEMM_N = 2048


def gemm_flops(n: int = GEMM_N) -> int:
    """FLOPs of one n x n x n matmul (a multiply and an add per term)."""
    return 2 * n**3


def gemm_peak(dtype: torch.dtype, n: int = GEMM_N, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of an n^3 matmul in `dtype`: the best of `repeats` timed calls after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"gflops": gemm_flops(n) / min(times) / 1e9, "seconds": times, "n": n,
            "gflops_per_cpu_s": gemm_flops(n) / min(cpu) / 1e9, "cpu_seconds": cpu}


def flops_per_token(total: int, trainable: int, full: bool) -> dict[str, int]:
    """Model FLOPs per trained token by both conventions (see module doc)."""
    six_n = 6 * total
    adapter = six_n if full else 4 * (total - trainable) + 6 * trainable
    return {"6N": six_n, "adapter": adapter}


def mfu_figures(tokens_per_s: float, total: int, trainable: int, full: bool,
                peaks_gflops: dict[str, float]) -> dict[str, Any]:
    """tokens/s -> model GFLOP/s by each convention, and its share of each peak."""
    per_token = flops_per_token(total, trainable, full)
    out: dict[str, Any] = {"tokens_per_s": tokens_per_s, "flops_per_token": per_token,
                           "model_gflops": {}, "mfu": {}}
    for conv, f in per_token.items():
        g = tokens_per_s * f / 1e9
        out["model_gflops"][conv] = g
        out["mfu"][conv] = {dt: g / peak for dt, peak in peaks_gflops.items()}
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
    from learnforget.runfolder import cpu_info

    return str(cpu_info().get("model") or "unknown")


# ------------------------------------------------------------------ the plain loop

def plain_model(s):
    """The model a user would build for this run's model and method, independent of the
    harness's objects: the same folder, float32, and peft's LoRA on all linear layers."""
    from transformers import AutoModelForCausalLM

    m = s.cfg.method
    torch.manual_seed(s.cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(s.base_path, dtype=torch.float32)
    if m.name == "full":
        return model
    if m.name != "lora":
        raise ValueError(f"the plain loop knows full and lora, not {m.name!r}")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(s.cfg.seed)
    alpha = m.alpha if m.alpha is not None else 2 * m.r
    return get_peft_model(model, LoraConfig(r=int(m.r), lora_alpha=alpha,
                                            lora_dropout=float(m.dropout),
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def plain_steps(s, steps: int) -> dict[str, list]:
    """The plain loop on the harness's first `steps` batches: wall and process CPU seconds and
    tokens of steps 2..`steps`, and the loss of every step."""
    from learnforget.train.plan import micro_batch

    t = s.cfg.train
    model = plain_model(s)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                            weight_decay=t.weight_decay)
    bf16 = s.policy.compute == "bf16"
    torch.manual_seed(s.cfg.seed)
    out: dict[str, list] = {"wall": [], "cpu": [], "tokens": [], "loss": []}
    for i in range(steps):
        batch = micro_batch(s.data, s.plan, t, i, s.cfg.seed, s.tokenizer.pad_token_id)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["loss"].append(loss.item())
        if i >= 1:
            out["wall"].append(time.perf_counter() - t0)
            out["cpu"].append(time.process_time() - c0)
            out["tokens"].append(int(batch["attention_mask"].sum()))
    return out


# train.speed as the harness ran before 2026-12 (`bench train --old`)
OLD_SPEED = ("train.speed.optimizer_impl=for_loop", "train.speed.frozen_cast=false",
             "train.speed.loss_chunk=0", "train.speed.compile=false")
CONVENTION = ("N: every parameter (embeddings included); full: 6N FLOPs per token; adapters: "
              "4 N_frozen + 6 N_trainable ('adapter'), with '6N' beside it; attention score "
              "matmuls not counted; peak: best of 3 n^3 matmuls (gemm_peak.n, 2048) in the same process")


def format_train(r: dict[str, Any]) -> str:
    peaks = r.get("gemm_peak", {})
    lines = [f"training throughput, {r['model']}, {r['batch_size']} x {r['seq_len']} tokens per "
             f"step, {r['timed_steps']} timed steps per loop and repeat (rate from the median step;"
             f"\nmedian [min, max] over repeats), CPU {r.get('cpu_model')}; GEMM n^3 peak "
             + ", ".join(f"{k} (n={v['n']}) {v['gflops']:.1f} GFLOP/s, {v['gflops_per_cpu_s']:.1f} "
                         "per CPU s" for k, v in peaks.items()) + ":",
             f"  {'method':<6} {'loop':<8} {'tok/s':>24} {'harness/loop':>22} {'by CPU time':>22}"
             f" {'MFU bf16':>9} {'MFU fp32':>9} {'MFU/CPU s':>9} {'loss diff':>10}"]
    # MFU per process CPU second, against the faster of the two peaks
    fast = max(peaks, key=lambda d: peaks[d]["gflops_per_cpu_s"]) if peaks else "fp32"
    for m, v in r["methods"].items():
        for k in ("harness", "old", "plain", "bare"):
            if f"{k}_tokens_per_s" not in v:
                continue
            mfu = v[f"{k}_mfu"]["mfu"]["adapter"]
            by_cpu = v[f"{k}_mfu_cpu"]["mfu"]["adapter"]
            ratio = "" if k == "harness" else fmt_spread(v[f"ratio_harness_over_{k}"])
            cpu = "" if k == "harness" else fmt_spread(v[f"cpu_ratio_{k}_over_harness"])
            diff = f"{v[f'max_rel_loss_diff_{k}']:.1e}" if f"max_rel_loss_diff_{k}" in v else ""
            lines.append(f"  {m:<6} {k:<8} {fmt_spread(v[f'{k}_tokens_per_s'], 1):>24} "
                         f"{ratio:>22} {cpu:>22} {mfu.get('bf16', 0):>9.3f} "
                         f"{mfu.get('fp32', 0):>9.3f} {by_cpu[fast]:>9.3f} {diff:>10}")
    if "lora_over_full_step_time" in r:
        lines.append(f"  LoRA r=8 / full step time: {fmt_spread(r['lora_over_full_step_time'])}; "
                     f"tokens/s: {fmt_spread(r['lora_over_full_tokens_per_s'])}")
    for m, v in r["methods"].items():
        e = v.get("harness_extras_ms")
        if e:
            lines.append(f"  {m}: the harness's own work per step, timed directly: "
                         f"{e['total']:.1f} ms = {100 * v['harness_extras_share_of_bare_step']:.2f}%"
                         f" of a bare step (clip {e['clip_grad_norm']:.1f}, batch "
                         f"{e['micro_batch']:.2f}, metrics line {e['metrics_line']:.3f} ms)")
    lines.append(f"  MFU: {r.get('convention', '')}; the 6N-convention figures are in the JSON")
    if r.get("cpu_steal_s") is not None:
        lines.append(f"  CPU time stolen by the hypervisor during the section: "
                     f"{r['cpu_steal_s']:.0f} s (it slows whichever loop it falls in; the CPU-time "
                     "ratio, loop CPU s per step / harness CPU s per step, does not count it)")
    return "\n".join(lines)
