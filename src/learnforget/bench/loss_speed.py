"""`learnforget bench loss`: the LM head + cross-entropy paths side by side on instruction data.

    learnforget bench loss [--model smollm2_135m] [--steps 10] [--loss-batch-size 8]

Instruction finetuning takes the loss on the response only: the prompt's tokens and the
padding carry label -100. transformers' loss computes the LM head's logits (and their
log-softmax and gradient) at every position and then ignores those; the chunked path
(`train.speed.loss_chunk`, learnforget.train.lm_loss) applies the head to the labelled positions
only. For each method, one run on the generated arithmetic instructions (data=arith_ift), then
`steps` micro-batches, each scored by both paths in alternating order (AB, BA, ...) so that drift
on a shared machine reaches both: forward + backward of the model, process CPU seconds and wall
seconds, the first batch untimed. Reported: the labelled share of the positions, each path's
median [min, max], the ratio chunked / transformers per batch, the hypervisor's stolen seconds
during the section, and the largest relative loss difference between the paths (summation
order only).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learnforget.bench.measure import cpu_steal_s, fmt_spread, spread, steal_since
from learnforget.errors import ConfigError

METHODS = {"lora": ["method=lora", "method.r=1", "method.targets=all", "method.dropout=0.0"],
           "full": ["method=full"]}
CHUNK = 1024


def _cfg(model: str, method: str, runs_dir: Path, batch_size: int, extra: Sequence[str]):
    from learnforget.config import compose

    return compose([f"model={model}", *METHODS[method], "data=arith_ift", "data.max_docs=200",
                    "data.heldout_docs=8", "train.seq_len=96", f"train.batch_size={batch_size}",
                    "train.precision=fp32", "train.heldout_batches=0", "logger=none",
                    "train.checkpoints.unit=steps", "train.checkpoints.at=[100]",
                    f"experiment_name=bench-loss-{method}", f"paths.runs_dir={runs_dir}",
                    *extra])


def bench_loss(model: str, steps: int, batch_size: int, runs_dir: Path,
               methods: Sequence[str] = ("lora", "full"),
               extra: Sequence[str] = ()) -> dict[str, Any]:
    from learnforget.train.lm_loss import chunked_loss
    from learnforget.train.loop import setup
    from learnforget.train.plan import micro_batch

    if steps < 2:
        raise ConfigError(f"--steps must be at least 2 for bench loss (the first is untimed), "
                          f"got {steps}")
    steal0 = cpu_steal_s()
    out: dict[str, Any] = {"model": model, "chunk": CHUNK, "batch_size": batch_size,
                           "methods": {}}
    for method in methods:
        s = setup(_cfg(model, method, runs_dir, batch_size, extra))
        pad = s.tokenizer.pad_token_id
        net = s.model
        times: dict[str, dict[str, list[float]]] = {k: {"cpu": [], "wall": []}
                                                    for k in ("transformers", "chunked")}
        labelled = positions = 0
        max_rel = 0.0
        for i in range(steps):
            batch = micro_batch(s.data, s.plan, s.cfg.train, i, s.cfg.seed, pad)
            labelled += int((batch["labels"][:, 1:] != -100).sum())
            positions += batch["labels"].numel()
            losses = {}
            for name in (("transformers", "chunked") if i % 2 else ("chunked", "transformers")):
                c0, t0 = time.process_time(), time.perf_counter()
                loss = chunked_loss(net, batch, CHUNK) if name == "chunked" \
                    else net(**batch).loss
                loss.backward()
                c, t = time.process_time() - c0, time.perf_counter() - t0
                net.zero_grad(set_to_none=True)
                losses[name] = loss.item()
                if i:
                    times[name]["cpu"].append(c)
                    times[name]["wall"].append(t)
            max_rel = max(max_rel, abs(losses["chunked"] - losses["transformers"])
                          / abs(losses["transformers"]))
        ratio = [a / b for a, b in zip(times["chunked"]["cpu"], times["transformers"]["cpu"],
                                       strict=True)]
        out["methods"][method] = {
            "labelled_share": labelled / positions,
            **{f"{k}_{m}_s": spread(v[m]) for k, v in times.items() for m in ("cpu", "wall")},
            "ratio_chunked_over_transformers_cpu": spread(ratio),
            "max_rel_loss_diff": max_rel}
        del s, net
    out["steal_s"] = steal_since(steal0)
    return out


def format_loss(r: dict[str, Any]) -> str:
    lines = [f"LM head + loss on instruction data ({r['model']}, batch {r['batch_size']} of "
             f"arith_ift, chunk {r['chunk']}; forward + backward per micro-batch, "
             "median [min, max]):",
             "  method  labelled  transformers CPU s  chunked CPU s  chunked/transformers (CPU)"
             "  max rel loss diff"]
    for m, v in r["methods"].items():
        lines.append(f"  {m:<6}  {v['labelled_share']:8.0%}  "
                     f"{fmt_spread(v['transformers_cpu_s']):>18}  "
                     f"{fmt_spread(v['chunked_cpu_s']):>13}  "
                     f"{fmt_spread(v['ratio_chunked_over_transformers_cpu']):>26}  "
                     f"{v['max_rel_loss_diff']:.1e}")
    if r.get("steal_s") is not None:
        lines.append(f"  CPU time stolen by the hypervisor during the section: {r['steal_s']:.1f} s")
    return "\n".join(lines)
