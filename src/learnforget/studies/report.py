"""The dry run's tables: the plan (jobs, states, GPU-hours), the data budget, the memory per
job (estimate next to what the run measured) and, for SLURM, the fit per GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from learnforget.studies.cluster import profile_resources
from learnforget.studies.cost import Cost
from learnforget.studies.plan import Job, Plan, shown_path
from learnforget.studies.values import fmt, split_override


def shown_params(job: Job, params: list[str] | None = None) -> str:
    """The job's own overrides, without method keys its method ignores (rank for full)."""
    from learnforget.methods.registry import ignored_keys

    ignored = {f"method.{k}" for k in ignored_keys(job.cfg.method)}
    return " ".join(p for p in (job.params if params is None else params)
                    if split_override(p)[0] not in ignored)


def print_plan(plan: Plan, total: float | None, launcher: str) -> None:
    s = plan.study
    print(f"study {s.name} ({shown_path(s.path)}): {s.description}")
    print(f"  experiment: {s.experiment_name}   stages: "
          f"{', '.join(plan.jobs[0].cfg.get('stages') or []) if plan.jobs else '-'}")
    print("  holds: " + " ".join(s.holds + plan.extra_fixed))
    if s.size:
        print(f"  size: {s.size} (its overrides are in `holds` above, after the study's own)")
    axes = " x ".join(f"{k} [{', '.join(v)}]" for k, v in s.sweep.items())
    if s.grid:
        print(f"  grid: {len(s.grid)} settings" + (f", crossed with {axes}" if axes else ""))
        for i, setting in enumerate(s.grid, 1):
            print(f"    {i:>2}. " + " ".join(t for _, t in setting))
    else:
        print(f"  sweeps: {axes or '(nothing: one job)'}")
    for r in s.rules:
        cond = " ".join(f"{k}={fmt(v)}" for k, v in (r.get("match") or {}).items()) or "always"
        print(f"  rule: {cond} -> " + " ".join(f"{k}={fmt(v)}" for k, v in r["set"].items()))
    for e in s.exclude:
        print("  exclude: " + " ".join(f"{k}={fmt(v)}" for k, v in e.items()))
    for n in s.notes:
        print(f"  note: {' '.join(n.split())}")
    width = max([len(shown_path(j.run_dir)) for j in plan.jobs] + [10])
    print(f"\n{'#':>3}  {'state':<8} {'next':<8} {'GPU-h':>8}  {'run folder':<{width}}  overrides")
    for j in plan.jobs:
        gh = "-" if j.gpu_hours is None else f"{j.gpu_hours:.1f}"
        print(f"{j.index:>3}  {j.state:<8} {j.next_stage or '-':<8} {gh:>8}  "
              f"{shown_path(j.run_dir):<{width}}  {shown_params(j)}")
        for d in j.duplicates:
            print(f"{'':>3}  {'':<8} {'':<8} {'':>8}  {'= same run as #' + str(j.index):<{width}}  "
                  f"{' '.join(d)}")
    counts = {st: sum(j.state == st for j in plan.jobs) for st in ("done", "running", "resume", "new")}
    dups = sum(len(j.duplicates) for j in plan.jobs)
    print(f"\n{plan.combinations} combinations"
          + (f", {plan.excluded} excluded" if plan.excluded else "")
          + f" -> {len(plan.jobs)} jobs ({dups} duplicate(s) merged: same run folder)")
    print("states: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if total is None:
        print("GPU-hours: no estimate in the study")
    else:
        todo = sum(j.gpu_hours or 0.0 for j in plan.jobs if j.state != "done")
        formula = s.cost.describe() if isinstance(s.cost, Cost) else f"{s.cost:g} per job"
        print(f"GPU-hours: {total:,.1f} in all, {todo:,.1f} still to run  (per job: {formula})")
    n_launch = sum(j.state in ("new", "resume") for j in plan.jobs)
    print(f"launcher: {launcher}; would launch {n_launch} job(s)")


def memory_table(plan: Plan, activations: bool = False) -> list[dict[str, Any]]:
    """Per job: trainable parameters and the memory estimate of `learnforget params` (meta
    device, nothing downloaded; computed once per distinct model x method x optimizer (x batch
    shape with `activations`)), next to what the run measured once it has run (run.json:
    train.peak_mem_mb, and for qlora runs train.quantisation.mean_rel_error).

    est_mib: weights + gradients + optimizer state; with `activations`, peak_est_mib adds one
    training step's activations traced on the meta device (slower: ~1-2 s per setting for a
    7B model)."""
    import warnings

    from learnforget.data.budget import tokens_per_param
    from learnforget.methods.registry import method_of, method_summary
    from learnforget.runfolder import RunFolder, TrainInfo
    from learnforget.train.params import cached_param_report

    rows = []
    for job in plan.jobs:
        c = job.cfg
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers/peft deprecation notices
                rep: Any = cached_param_report(c, activations=activations)
        except Exception as e:  # a method the meta-device count cannot build: say so
            rep = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        quant = method_of(c.method).quantisation(c.method)
        base = quant.label if quant is not None else str(c.model.dtype)
        record = RunFolder(job.run_dir).read_record()
        train = record.train if record else TrainInfo()
        quant = train.quantisation or {}
        row = {"index": job.index, "method": method_summary(c.method), "model": str(c.model.name),
               "base": base, "trainable": None, "est_mib": None, "peak_est_mib": None,
               "error": None, "trainable_run": train.trainable_params,
               "peak_mib": train.peak_mem_mb, "quant_error": quant.get("mean_rel_error")}
        if isinstance(rep, str):
            row["error"] = rep
        else:
            if quant is None:  # the precision policy's dtype of the frozen weights
                row["base"] = str(getattr(rep, "frozen", base))
            row.update(trainable=rep.trainable, est_mib=rep.total_bytes / 2**20,
                       method_note=getattr(rep, "method_note", ""))
            if activations and getattr(rep, "activations_bytes", None) is not None:
                row["peak_est_mib"] = rep.peak_bytes / 2**20
        row["tokens_per_param"] = tokens_per_param(c, row["trainable"])  # the regime
        rows.append(row)
    return rows


def print_memory(rows: list[dict[str, Any]]) -> None:
    """The memory table of a dry run (see memory_table)."""
    if not rows:
        return
    with_act = any(r["peak_est_mib"] is not None for r in rows)
    quant = any(r["quant_error"] is not None for r in rows)
    print("\nmemory per job: est. = `learnforget params` on the meta device (weights + gradients "
          "+ optimizer state" + ("; est. peak adds one step's traced activations" if with_act
                                 else ", activations excluded: --activations traces them") +
          "); peak = measured, run.json train.peak_mem_mb (CUDA max allocated; on CPU the "
          "process's max RSS), '-' until the job has trained"
          + ("; quant err = mean relative error of the quantised base weights" if quant else "")
          + "; tokens/param = tokens to the last budget per trainable parameter (the regime; "
          "the paper's code CPT: ~500 at LoRA r=16, ~30 at r=256)")
    mw = max(len(r["method"]) for r in rows) + 1
    bw = max(len(r["base"]) for r in rows + [{"base": "base"}]) + 1
    print(f"{'#':>3}  {'method':<{mw}} {'base':<{bw}} {'trainable':>15} {'est. MiB':>12}"
          + (f" {'est. peak MiB':>14}" if with_act else "") + f" {'tokens/param':>13}"
          + f" {'peak MiB':>10}" + (f" {'quant err':>10}" if quant else ""))
    for r in rows:
        tpp = r.get("tokens_per_param")
        tpp_cell = f" {'-' if tpp is None else f'{tpp:.4g}':>13}"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
        head = f"{r['index']:>3}  {r['method']:<{mw}} {r['base']:<{bw}}"
        if r["error"]:
            print(f"{head} {'n/a':>15} {'n/a':>12}{tpp_cell} {peak:>10}  ({r['error']})")
            continue
        pe = "-" if r["peak_est_mib"] is None else f"{r['peak_est_mib']:,.1f}"
        qe = "-" if r["quant_error"] is None else f"{r['quant_error']:.4f}"
        print(f"{head} {r['trainable']:>15,} {r['est_mib']:>12,.1f}"
              + (f" {pe:>14}" if with_act else "") + tpp_cell + f" {peak:>10}"
              + (f" {qe:>10}" if quant else ""))
    notes: dict[str, list[int]] = {}
    for r in rows:  # what a method holds beside its parameters (Method.extra_memory)
        if r.get("method_note"):
            notes.setdefault(r["method_note"], []).append(r["index"])
    for note, jobs in notes.items():
        print(f"  jobs {', '.join(map(str, jobs))}: {note}")


def print_data_budget(plan: Plan) -> None:
    """Per job: its token budget against its corpus (learnforget.data.budget.budget_report)."""
    from learnforget.data.budget import budget_report, format_budget_rows

    if not plan.jobs:
        return
    rows = [budget_report(j.cfg) for j in plan.jobs]
    print("\n" + format_budget_rows(rows, [j.index for j in plan.jobs]))


def fit_rows(plan: Plan, profile: Path) -> tuple[Any, list[dict[str, Any]], Path]:
    """Whether each job fits the GPUs of its cluster profile (learnforget.train.gpu_fit)."""
    from learnforget.train import gpu_fit

    gp = gpu_fit.gpu_plan(profile_resources(profile))
    return gp, [gpu_fit.check(j.cfg, gp) for j in plan.jobs], profile


def print_fit(plan: Plan, fit: tuple[Any, list[dict[str, Any]], Path], methods: list[str]) -> None:
    """The fit table of `fit_rows`, and each job's global batch against the study's."""
    from learnforget.train import gpu_fit

    gp, rows, profile = fit
    print(f"\ncluster profile {shown_path(profile)}: {gp.ranks} GPU(s) per job"
          + (f", {gp.gpu_mem_gib:g} GB each" if gp.gpu_mem_gib else ", gpu_mem_gb not set"))
    print(gpu_fit.format_rows(rows, methods))
    print(gpu_fit.format_host_rows(rows, methods))
    want = plan.study.global_batch
    bad = [r for r in rows if want and r["global_batch"] != want]
    if bad:
        print(f"WARNING: the study's global batch is {want} sequences, but {len(bad)} job(s) "
              f"would step on {bad[0]['global_batch']} (train.batch_size x train.grad_accum x "
              f"{gp.ranks} ranks): set train.grad_accum to match this profile")
    n_bad = sum(r["fits"] is False for r in rows)
    print(f"fit: {len(rows) - n_bad} of {len(rows)} job(s) fit"
          + (f"; {n_bad} do NOT (see the advice)" if n_bad else ""))


def protocol_notes(plan: Plan) -> dict[str, list[int]]:
    """Changes of scoring or training the user should know before launching, each with the jobs
    it touches: the fp32 scoring head on a body that is not fp32 (eval.head), and IFT runs that
    normalise the loss by tokens where a run folder with the earlier micro-batch means exists."""
    from learnforget.eval.suite import head_note
    from learnforget.train.step import legacy_note

    notes: dict[str, list[int]] = {}
    for job in plan.jobs:
        for note in (head_note(job.cfg.eval, job.cfg), legacy_note(job.cfg)):
            if note:
                notes.setdefault(note, []).append(job.index)
    return notes


def print_protocol_notes(plan: Plan) -> None:
    notes = protocol_notes(plan)
    if notes:
        print("\nto know before launching:")
    for note, jobs in notes.items():
        print(f"  - job(s) {', '.join(map(str, jobs))}: {note}")
