"""`learnforget bench train`, precision part: the step time of bf16 compute (with fp32 master
weights, the harness's policy) against fp32 compute, side by side on the same model, data and
optimizer, with both loss curves.

Per method and repeat, each precision sets up its own run (same seed, same batches) and trains
`steps` steps through `train.fit`; the two alternate which goes first (ABBA). A precision's
step time in a repeat is its median step (the first step is not timed). The loss curves are
the per-step training losses of the first repeat: the same batches, so they differ only by the
rounding of bf16 compute.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PRECISIONS = ("bf16", "fp32")


def _losses(run: Path) -> list[float]:
    from learnforget.runfolder import RunFolder

    rows = [json.loads(x) for x in RunFolder(run).metrics.read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def bench_precision(model: str, repeats: int, steps: int, batch_size: int, seq_len: int,
                    runs_dir: Path, methods: Sequence[str] = ("lora", "full"),
                    extra: Sequence[str] = ()) -> dict[str, Any]:
    from learnforget.bench.measure import cpu_steal_s, harness_steps, run_cfg, spread, steal_since
    from learnforget.train.loop import setup

    res: dict[str, Any] = {"model": model, "batch_size": batch_size, "seq_len": seq_len,
                           "timed_steps": steps - 1, "methods": {}}
    steal0 = cpu_steal_s()
    for method in methods:
        step_s: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        curves: dict[str, list[float]] = {}
        for rep in range(repeats):
            order = PRECISIONS if rep % 2 == 0 else PRECISIONS[::-1]
            for p in order:
                cfg = run_cfg(model, method, runs_dir, f"bench-prec-{method}-{p}-{rep}",
                              batch_size=batch_size, seq_len=seq_len, steps=steps,
                              extra=[*extra, f"train.precision={p}"])
                s = setup(cfg)
                m = harness_steps(s, steps)
                step_s[p].append(statistics.median(m["wall"]))
                if rep == 0:
                    curves[p] = _losses(s.out)
                del s
        rel = [abs(a - b) / abs(b) for a, b in zip(curves["bf16"], curves["fp32"], strict=True)]
        res["methods"][method] = {
            "bf16_step_s": spread(step_s["bf16"]), "fp32_step_s": spread(step_s["fp32"]),
            "bf16_over_fp32_step_time": spread(
                [a / b for a, b in zip(step_s["bf16"], step_s["fp32"], strict=True)]),
            "loss_bf16": curves["bf16"], "loss_fp32": curves["fp32"],
            "max_rel_loss_diff": max(rel)}
    res["cpu_steal_s"] = steal_since(steal0)
    return res


def format_precision(r: dict[str, Any]) -> str:
    from learnforget.bench.measure import fmt_spread

    lines = [f"bf16 compute (fp32 masters) vs fp32 compute, {r['model']}, {r['batch_size']} x "
             f"{r['seq_len']} tokens, median step over {r['timed_steps']} timed steps "
             "(median [min, max] over repeats):",
             f"  {'method':<6} {'bf16 s/step':>24} {'fp32 s/step':>24} {'bf16/fp32 time':>22}"]
    for m, v in r["methods"].items():
        lines.append(f"  {m:<6} {fmt_spread(v['bf16_step_s']):>24} {fmt_spread(v['fp32_step_s']):>24} "
                     f"{fmt_spread(v['bf16_over_fp32_step_time']):>22}")
    for m, v in r["methods"].items():
        lines.append(f"  {m} loss per step (same batches), max relative difference "
                     f"{v['max_rel_loss_diff']:.2e}:")
        lines.append("    bf16 " + " ".join(f"{x:.4f}" for x in v["loss_bf16"]))
        lines.append("    fp32 " + " ".join(f"{x:.4f}" for x in v["loss_fp32"]))
    if r.get("cpu_steal_s") is not None:
        lines.append(f"  CPU time stolen by the hypervisor during this part: {r['cpu_steal_s']:.0f} s")
    return "\n".join(lines)
