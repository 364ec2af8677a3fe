"""The disk bill of a study, before the launch: what each job writes under the runs folder
(budget checkpoints, cooldown branches, resume states) and the token shards its corpus needs
in the cache, from parameter counts on the meta device (learnforget.train.params: nothing is
downloaded), compared with the free space there (shutil.disk_usage). `learnforget sweep STUDY
--dry-run` prints it and warns when the study does not fit.

Per job (C: one budget checkpoint, R: one resume state, n: budgets):

- C: the saved weights. Methods saved as a whole model (full, bitfit, ...) write every weight,
  the trainable ones in the master dtype (fp32 masters: 4 bytes each; Llama-2-7B full:
  6.74e9 x 4 = 27.0 GB); adapters write only their trainable weights (float32).
- R: train/resume.pt (or FSDP's resume-shards-*): trainable weights + optimizer state
  (AdamW: 2 moments, LionW: 1, in the master dtype) + a little (schedule, RNG). It is rewritten
  atomically, so two copies exist while it is written; a finished run deletes it.
- single cooldown: peak n x C + 2 x R; kept after the run: n x C.
- train.cooldown_mode=branches: the plateau run writes one branch resume state per budget (all
  n on disk when it ends), each branch then trains and writes its checkpoint, which is copied
  into the main run: peak n x R + 2 x R + 2 x n x C (an upper bound); kept: 2 x n x C, of which
  branches/<label>/checkpoints/ (n x C) may be deleted once the run has published them.

Token shards: per distinct corpus, training tokens x 2 bytes (vocabularies up to 65,536 tokens;
4 above), known from the shard manifest once prepared, else from data.expected_tokens.
Eval results, spectra, logs and the W&B mirror are small next to these (megabytes) and left
out. The study total adds up the jobs not done, as if all ran at once (a SLURM array does).
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

GB = 1e9
STATE_EXTRA = 1 << 20  # the schedule, RNG states and progress in a resume state (about)


@dataclass
class JobDisk:
    index: int
    method: str
    done: bool
    checkpoint: float | None = None  # bytes of one budget checkpoint
    budgets: int = 0
    resume: float | None = None
    peak: float | None = None
    kept: float | None = None
    branches: bool = False
    error: str | None = None


def job_disk(cfg: DictConfig, index: int = 0, done: bool = False) -> JobDisk:
    """One job's checkpoint, resume-state, peak and kept bytes (see the module's formulas)."""
    from learnforget.methods.registry import checkpoint_format, method_summary
    from learnforget.train.params import cached_param_report

    n = len(cfg.train.checkpoints.at)
    branches = str(cfg.train.get("cooldown_mode", "single")) == "branches"
    row = JobDisk(index, method_summary(cfg.method), done, budgets=n, branches=branches)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = cached_param_report(cfg, activations=False)
    except Exception as e:  # a method the meta-device count cannot build
        row.error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        return row
    whole = checkpoint_format(cfg.method) == "safetensors"
    trainable_b = rep.grads_bytes  # the trainable weights in their (master) dtype
    row.checkpoint = float(rep.weights_bytes) if whole else float(trainable_b)
    row.resume = float(trainable_b + rep.optimizer_bytes + STATE_EXTRA)
    if branches:
        row.peak = n * row.resume + 2 * row.resume + 2 * n * row.checkpoint
        row.kept = 2 * n * row.checkpoint
    else:
        row.peak = n * row.checkpoint + 2 * row.resume
        row.kept = n * row.checkpoint
    return row


def corpus_disk(cfg: DictConfig) -> tuple[str, float | None, str]:
    """(key, bytes still to write, note) of the job's token shards; key '' for in-memory data."""
    from learnforget.data.shards import corpus_dir, data_format, read_manifest

    d = cfg.data
    if data_format(d) != "shards":
        return "", None, ""
    folder = corpus_dir(Path(str(cfg.paths.cache_dir)).expanduser(), d, cfg.model)
    m = read_manifest(folder)
    vocab = int((cfg.model.get("arch") or {}).get("vocab_size") or 0)
    item = 2 if 0 < vocab <= 2**16 else 4
    if m and m.get("complete"):
        size = sum(f.stat().st_size for f in folder.glob("*.bin"))
        return str(folder), 0.0, f"data={d.name}: prepared, {size / GB:,.1f} GB in {folder}"
    expected = d.get("expected_tokens")
    if not expected:
        return str(folder), None, (f"data={d.name}: shard size unknown until prepared (no "
                                   "data.expected_tokens)")
    need = float(expected) * item
    return str(folder), need, (f"data={d.name}: {float(expected):,.0f} tokens x {item} B = "
                               f"{need / GB:,.1f} GB to write into {folder} (not prepared; "
                               "data.expected_tokens)")


def existing(path: Path) -> Path:
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_bill(plan: Any) -> dict[str, Any]:
    """Rows per job, the shard notes, and per file system (runs folder, cache) the bytes
    needed by the jobs not done and the bytes free."""
    rows = [job_disk(j.cfg, j.index, j.state == "done") for j in plan.jobs]
    corpora: dict[str, tuple[float | None, str]] = {}
    for j in plan.jobs:
        if j.state != "done":
            key, need, note = corpus_disk(j.cfg)
            if key:
                corpora.setdefault(key, (need, note))
    runs = existing(Path(str(plan.jobs[0].cfg.paths.runs_dir))) if plan.jobs else existing(Path())
    cache = existing(Path(str(plan.jobs[0].cfg.paths.cache_dir))) if plan.jobs else runs
    runs_need = sum(r.peak or 0.0 for r in rows if not r.done)
    cache_need = sum(n or 0.0 for n, _ in corpora.values())
    places = {"runs": (runs, runs_need), "cache": (cache, cache_need)}
    if os.stat(runs).st_dev == os.stat(cache).st_dev:  # one file system: one sum
        places = {"runs+cache": (runs, runs_need + cache_need)}
    fs = {name: {"path": str(p), "need": need, "free": float(shutil.disk_usage(p).free)}
          for name, (p, need) in places.items()}
    return {"rows": rows, "corpora": [note for _, note in corpora.values()], "fs": fs,
            "unknown": [r.index for r in rows if r.error and not r.done]}


def _gb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / GB:,.1f} GB" if x >= 0.1 * GB else f"{x / 1e6:,.1f} MB"


def print_disk(plan: Any) -> dict[str, Any]:
    """The dry run's disk table, the study's needs against the free space, and a warning line
    (stderr) for each file system the study does not fit."""
    if not plan.jobs:
        return {}
    bill = disk_bill(plan)
    rows = bill["rows"]
    print("\ndisk per job (GB = 1e9 bytes; from parameter counts on meta): checkpoint = one "
          "budget's saved weights, resume = train/resume.pt (trainable weights + optimizer "
          "state), peak = while it trains (budgets x checkpoint + 2 resume states, as one is "
          "rewritten; cooldown branches add a resume state per budget and a second copy of "
          "each checkpoint), kept = after it finishes (the resume state is deleted)")
    mw = max(len(r.method) for r in rows) + 1
    print(f"{'#':>3}  {'method':<{mw}} {'checkpoint':>12} {'x':>3} {'resume':>12} {'peak':>12} "
          f"{'kept':>12}  state")
    for r in rows:
        state = "done (on disk)" if r.done else "to run"
        if r.error:
            print(f"{r.index:>3}  {r.method:<{mw}} {'n/a':>12}  ({r.error}) {state}")
            continue
        print(f"{r.index:>3}  {r.method:<{mw}} {_gb(r.checkpoint):>12} {r.budgets:>3} "
              f"{_gb(r.resume):>12} {_gb(r.peak):>12} {_gb(r.kept):>12}  {state}"
              + ("; branches" if r.branches else ""))
    for note in bill["corpora"]:
        print(f"token shards: {note}")
    for name, f in bill["fs"].items():
        print(f"study ({name}): {_gb(f['need'])} needed by the jobs not done (all at once), "
              f"{_gb(f['free'])} free under {f['path']}")
        if f["need"] > f["free"]:
            print(f"learnforget: warning: the study does not fit on disk: it needs about "
                  f"{_gb(f['need'])} under {f['path']} ({name}) and {_gb(f['free'])} are free: "
                  "free space, point paths.runs_dir/paths.cache_dir elsewhere, or run fewer jobs "
                  "at once (docs/faults.md: what may be deleted)", file=sys.stderr, flush=True)
    if bill["unknown"]:
        print(f"(jobs {', '.join(map(str, bill['unknown']))}: no estimate, not counted)")
    return bill
