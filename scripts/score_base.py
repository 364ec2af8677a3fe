"""Score the base model alone on an eval suite's lm-eval tasks (no run folder, no training),
timing each task, with the CPU time the hypervisor stole meanwhile (/proc/stat).

    PYTHONPATH=src python scripts/score_base.py --suite paper --tasks arc_challenge,winogrande \
        --subset hellaswag=2000 --threads 1 --out base.json

Each task runs in its own lm-eval call, so its wall time is its own. `--subset name=N` scores a
fixed seeded subset of N items (the suite's subset_seed); otherwise the suite's own subset or
limit applies (`--full`: every item). The JSON holds per task n, the primary metric, its
stderr, wall time, requests and steal, and the per-item results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf


def steal_seconds() -> float:
    """Stolen CPU time so far, all CPUs (the `cpu` line of /proc/stat, field 8, in USER_HZ)."""
    import os

    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="demo")
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    p.add_argument("--subset", action="append", default=[], help="task=N (repeatable)")
    p.add_argument("--full", action="store_true", help="every item (no subset, no limit)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--backend", default=None, help="hf or shared (default: the suite's)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    import torch

    from learnforget.assets.cache import default_cache_dir
    from learnforget.assets.models import load_model
    from learnforget.config import compose
    from learnforget.eval.scoring import score
    from learnforget.eval.suite import task_specs
    from learnforget.eval.task_yaml import write_task_dir

    if a.threads:
        torch.set_num_threads(a.threads)
    cache = default_cache_dir()
    cfg = compose([f"model={a.model}", f"eval={a.suite}", f"paths.cache_dir={cache}"])
    ev = cfg.eval
    OmegaConf.set_struct(cfg, False)
    sizes = dict(s.split("=", 1) for s in a.subset)
    for t in ev.tasks:
        if a.full:
            t.subset, t.limit = None, None
        if t.name in sizes:
            t.subset, t.limit = int(sizes[t.name]), None
    if a.full:
        ev.limit = None
    if a.batch_size:
        ev.batch_size = a.batch_size
    if a.backend:
        ev.backend = a.backend
    wanted = [x for x in a.tasks.split(",") if x] or [str(t.name) for t in ev.tasks]
    ev.tasks = [t for t in ev.tasks if t.name in wanted]
    ev.ppl, ev.drift.enabled = [], False
    ev.diversity.prompts = []
    specs = task_specs(ev, cache)
    include = write_task_dir(specs, a.out.parent / f".{a.out.stem}-tasks")
    model, tokenizer, _ = load_model(cfg.model, OmegaConf.create({"name": "full"}), cache, "cpu")
    model.eval()
    out: dict = {"model": a.model, "suite": a.suite, "threads": torch.get_num_threads(),
                 "backend": str(ev.get("backend", "hf")),
                 "torch": torch.__version__, "tasks": {}}
    for spec in specs:
        one = ev.copy()
        one.tasks = [t for t in ev.tasks if t.name == spec.name]
        s0, t0, c0 = steal_seconds(), time.perf_counter(), time.process_time()
        res = score(model, tokenizer, cfg, one, [spec], include, cache)["tasks"][spec.name]
        wall, stolen = time.perf_counter() - t0, steal_seconds() - s0
        cpu = time.process_time() - c0
        load = Path("/proc/loadavg").read_text().split()[0]
        n_req = sum(len(x) for x in res.get("items", {}).get("lls", [])) or None
        out["tasks"][spec.name] = {
            "n": res["n"], "metric": res["primary_metric"], "value": res["primary"],
            "stderr": res["stderr"].get(res["primary_metric"]), "metrics": res["metrics"],
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "loadavg_1min_end": load,
            "steal_s": round(stolen, 1), "requests": n_req,
            "requests_per_cpu_s": round(n_req / cpu, 2) if n_req else None,
            "requests_per_s": round(n_req / wall, 2) if n_req else None,
            "items_per_s": round(res["n"] / wall, 2) if res["n"] else None,
            "subset": res.get("subset"), "items": res.get("items")}
        r = out["tasks"][spec.name]
        print(f"{spec.name}: n={r['n']} {r['metric']}={r['value']:.4f} ± {r['stderr']:.4f} "
              f"wall {r['wall_s']}s ({r['requests_per_s']} requests/s, {r['items_per_s']} "
              f"items/s) cpu {r['cpu_s']}s ({r['requests_per_cpu_s']} requests per CPU s) "
              f"steal {r['steal_s']}s load {load}", flush=True)
        a.out.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
