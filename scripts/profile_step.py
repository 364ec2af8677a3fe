"""Profile one training step of the harness (learnforget.train.loop.setup, then the phases of
learnforget.train.step.train_step) with torch.profiler: where the time of a step goes.

    nice python scripts/profile_step.py --model smollm2_135m --method full --precision fp32
    nice python scripts/profile_step.py --method lora --precision bf16 train.speed.optimizer_impl=for_loop

Prints the wall time of each phase (forward split into decoder / LM head / loss, backward,
clipping, optimizer, zero_grad) and torch.profiler's top operators by self CPU time. The
first step warms up and is not profiled. KEY=VALUE words are config overrides.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--method", default="full", choices=("full", "lora"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--top", type=int, default=25)
    extra = [a for a in argv if "=" in a and not a.startswith("-")]
    a = p.parse_args([x for x in argv if x not in extra])

    from learnforget.bench.measure import run_cfg
    from learnforget.train.loop import setup
    from learnforget.train.step import train_step

    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_cfg(a.model, a.method, Path(tmp), "profile", batch_size=a.batch_size,
                      seq_len=a.seq_len, steps=3,
                      extra=[*extra, f"train.precision={a.precision}"])
        s = setup(cfg)
        s.model.train()
        t0 = time.perf_counter()
        train_step(s, s.model, 1)  # warm-up
        print(f"warm-up step {time.perf_counter() - t0:.2f} s", flush=True)
        phases = _phases(s)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            _phases(s)
        print(f"{a.model} {a.method} {a.precision} {a.batch_size} x {a.seq_len}: "
              f"notes {s.notes[-3:]}")
        total = sum(phases.values())
        for k, v in phases.items():
            print(f"  {k:<12} {v:7.3f} s  {100 * v / total:5.1f}%")
        print(f"  {'step':<12} {total:7.3f} s  ({a.batch_size * a.seq_len / total:.1f} tokens/s, "
              "unprofiled)")
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=28,
            max_shapes_column_width=60))
    return 0


def _phases(s) -> dict[str, float]:
    """One step split into timed phases (the same work as train_step, grad_accum=1)."""
    from learnforget.train.plan import loss_tokens, micro_batch
    from learnforget.train.step import prepends_virtual_tokens

    out: dict[str, float] = {}
    t = s.cfg.train
    n = loss_tokens(s.data, s.plan, t, 2, s.cfg.seed, 1, prepends_virtual_tokens(s.model))
    batch = micro_batch(s.data, s.plan, t, 1, s.cfg.seed, s.tokenizer.pad_token_id)
    base = s.model.get_base_model() if hasattr(s.model, "get_base_model") else s.model
    clock = time.perf_counter
    with s.policy.autocast(s.device):
        t0 = clock()
        with record_function("## decoder forward"):
            hidden = base.model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).last_hidden_state
        t1 = clock()
        with record_function("## lm_head"):
            logits = base.lm_head(hidden)
        t2 = clock()
        with record_function("## loss"):
            loss = base.loss_function(logits, batch["labels"], vocab_size=logits.shape[-1],
                                      num_items_in_batch=n)
        t3 = clock()
    out["decoder fwd"], out["lm_head fwd"], out["loss fwd"] = t1 - t0, t2 - t1, t3 - t2
    with record_function("## backward"):
        t0 = clock()
        loss.backward()
        out["backward"] = clock() - t0
    with record_function("## clip"):
        t0 = clock()
        torch.nn.utils.clip_grad_norm_(s.params, t.grad_clip)
        out["clip"] = clock() - t0
    with record_function("## optimizer"):
        t0 = clock()
        s.optimizer.step()
        out["optimizer"] = clock() - t0
    with record_function("## zero_grad"):
        t0 = clock()
        s.optimizer.zero_grad(set_to_none=True)
        out["zero_grad"] = clock() - t0
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
