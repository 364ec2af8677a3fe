"""Every `learnforget ...` command in a code block of README.md and docs/*.md parses with the
real command line, and, for the commands that compose a config (train, job, eval, params,
data prepare, prepare, sweep, demo), its config composes and validates: each combination of a
`-m` sweep, every job of a study. Nothing trains, scores, fetches or launches: the function
each command would call next is replaced by one that stops with what it was given.

A command that cannot compose on this machine carries a tag in its shell comment (docs/index.md
lists them): `# [cluster]` (needs SLURM or a GPU node), `# [user files]` (names files you make
first). A tagged command is still parsed.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import re
import shlex
from pathlib import Path

import pytest

from learnforget import cli
from learnforget.config import compose, validate
from learnforget.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TAGS = ("cluster", "user files")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[^\n]*)\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
SHELL = ("", "bash", "sh", "shell", "console")
WRAPPERS = ("srun", "torchrun", "time", "/usr/bin/time", "nice", "env", "sudo")  # run learnforget


def commands_in(text: str, name: str) -> list[tuple[str, str, str | None]]:
    """(name:line, command line after `learnforget`, tag) for each `learnforget` command in a
    fenced code block of a Markdown text (fences may be indented, as in a list item)."""
    found = []
    for block in FENCE.finditer(text):
        if block.group("lang").strip() not in SHELL:
            continue
        line_no = text[:block.start()].count("\n") + 2
        for i, line in enumerate(block.group("body").replace("\\\n", " ").splitlines()):
            code, _, comment = line.partition(" #")
            if not re.search(r"(^|[\s/])learnforget(\s|$)", code):
                continue
            words = shlex.split(re.sub(r"<[^>]*>", "PLACEHOLDER", code), comments=True)
            at = next(k for k, w in enumerate(words)
                      if w == "learnforget" or w.endswith("/learnforget"))
            if at > 0 and words[0] not in WRAPPERS:
                continue  # e.g. `echo learnforget`
            tag = next((t for t in TAGS if f"[{t}]" in comment), None)
            found.append((f"{name}:{line_no + i}",
                          " ".join(shlex.quote(w) for w in words[at + 1:]), tag))
    return found


def doc_commands() -> list[tuple[str, str, str | None]]:
    return [c for page in PAGES for c in commands_in(page.read_text(), str(page.relative_to(ROOT)))]


COMMANDS = doc_commands()


class Stop(Exception):
    """Raised where the command would start its work: what it was given."""

    def __init__(self, what: str, payload):
        super().__init__(what)
        self.what, self.payload = what, payload


def _stopper(what: str):
    def stop(*args, **kwargs):
        raise Stop(what, (args, kwargs))
    return stop


@pytest.fixture
def stopped(monkeypatch, tmp_path):
    """The CLI with every stage's entry point replaced by a Stop, run in an empty folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LEARNFORGET_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LEARNFORGET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "run_hydra", lambda stage, task, args: _stopper(stage)(list(args)))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        _parse_then_stop(argparse.ArgumentParser.parse_args))
    import learnforget.analysis.controls_cli as controls_cli
    import learnforget.assets.models as models
    import learnforget.assets.registry as registry
    import learnforget.eval.stage as eval_stage
    import learnforget.nodecheck as nodecheck
    import learnforget.studies.command as command
    import learnforget.studies.prepare as prepare
    import learnforget.train.params as params

    for module, name, what in [
            (command, "sweep_main", "sweep"), (prepare, "prepare_configs", "prepare"),
            (registry, "fetch_assets", "assets"), (nodecheck, "run_checks", "node-check"),
            (eval_stage, "eval_main", "eval"), (eval_stage, "evaluate_run", "eval run"),
            (params, "param_report", "params"), (models, "base_model_dir", "data prepare"),
            (controls_cli, "main", "controls")]:
        monkeypatch.setattr(module, name, _stopper(what))
    return tmp_path


def _parse_then_stop(parse):
    def parse_args(self, args=None, namespace=None):
        raise Stop(self.prog, parse(self, args, namespace))
    return parse_args


def _combinations(overrides: list[str]) -> list[list[str]]:
    """Every job of a `-m` override list (Hydra's own parser expands a,b and ranges)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(c) for c in itertools.product(*axes)]


def _compose_all(overrides: list[str]) -> int:
    for combo in _combinations(overrides):
        validate(compose([o for o in combo if not o.startswith("hydra/")]))
    return len(_combinations(overrides))


@functools.cache
def _compose_study(study: str, overrides: tuple[str, ...], size: str | None) -> int:
    """The number of jobs of a study, each composed and validated (once per module: several
    pages show the same study)."""
    from learnforget.studies.plan import expand
    from learnforget.studies.study import apply_size, find_study, load_study

    s, rest = apply_size(load_study(find_study(study)), size, list(overrides))
    plan = expand(s, rest)
    assert plan.jobs, f"study {study} has no jobs"
    return len(plan.jobs)


def check(words: list[str], tag: str | None, where: Path) -> str:
    """Run the command up to its work; compose what it would compose. What was checked."""
    if tag is not None:
        return check_tagged(words, tag)
    if words[0] == "eval" and len(words) > 1 and "=" not in words[1] and not words[1].startswith("-"):
        (where / words[1]).mkdir(parents=True)  # the run folder it names, as training leaves it
        (where / words[1] / "config.yaml").write_text("{}\n")
    with pytest.raises(Stop) as stop:
        rc = cli.main(words)
        raise AssertionError(f"`learnforget {' '.join(words)}` returned {rc} before its work")
    s = stop.value
    return composed(s)


def check_tagged(words: list[str], tag: str) -> str:
    """A command that names what only the user or a cluster has: its overrides parse
    (Hydra's grammar), its subcommand exists, and it runs up to its work or to the one-line
    error about what is missing here."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert words[0] in cli.COMMANDS, f"unknown command {words[0]!r}"
    OverridesParser.create().parse_overrides([w for w in words[1:] if "=" in w
                                              and not w.startswith("-")])
    try:
        rc = cli.main(words)
    except Stop as s:
        return f"parsed ({s.what}); not composed: [{tag}]"
    return f"parsed; exit {rc} here: [{tag}]"


def composed(s: Stop) -> str:
    """What the command was about to work on, composed and validated."""
    args, kwargs = s.payload if isinstance(s.payload, tuple) else ((), {})
    if s.what in ("train", "job"):
        hydra_flags = {"-m", "--multirun", "--cfg", "-c", "job", "hydra", "all"}
        overrides = [a for a in args[0] if a not in hydra_flags]
        return f"composed {_compose_all(overrides)} config(s)"
    if s.what == "sweep":
        n = _compose_study(args[0], tuple(args[1] if len(args) > 1 else kwargs.get("overrides", ())),
                           kwargs.get("size"))
        return f"composed {n} job(s)"
    if s.what == "learnforget demo":
        from learnforget.studies.demo import SIZES

        ns = s.payload
        return f"composed {_compose_study(SIZES[ns.size], tuple(ns.overrides), None)} job(s)"
    if s.what in ("eval", "params"):
        validate(args[0])
        return "composed 1 config"
    if s.what == "eval run":
        return "composed the eval overrides (for the named run folder)"
    if s.what == "data prepare":  # cmd_data composed and validated before asking for the model
        return "composed 1 config"
    if s.what == "prepare":
        return f"composed {len(args[0])} config(s)"
    if s.what == "assets":
        from learnforget.assets.registry import ASSETS

        names = args[1] if len(args) > 1 else kwargs.get("names")
        unknown = [n for n in names or [] if n not in ASSETS]
        assert not unknown, f"unknown asset(s) {unknown}"
        return f"parsed; assets {names or 'all'} known"
    return f"parsed ({s.what})"


@pytest.mark.parametrize("where,line,tag", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_composes(where, line, tag, stopped):
    try:
        check(shlex.split(line), tag, stopped)
    except ConfigError as e:
        raise AssertionError(f"{where}: `learnforget {line}`: {e}") from e


def test_the_docs_have_commands_and_every_command_is_known():
    assert len(COMMANDS) >= 20, COMMANDS
    for where, line, _ in COMMANDS:
        assert shlex.split(line)[0] in cli.COMMANDS, f"{where}: `learnforget {line}`"


def test_commands_are_found_in_fences_with_their_tags():
    text = """Intro `learnforget train` inline is prose, not a command.

```bash
make demo                 # = learnforget demo
learnforget eval runs/default/<run name> eval=offline   # score it
.venv/bin/learnforget sweep demo_tiny \\
    --dry-run
```

1. A step:

   ```bash
   srun --pty learnforget node-check --json n.json   # [cluster] a GPU node
   learnforget train 'hydra.searchpath=[file:///x]' eval=mine   # [user files]
   ```

```yaml
name: learnforget
```
"""
    assert commands_in(text, "p") == [
        ("p:5", "eval runs/default/PLACEHOLDER eval=offline", None),
        ("p:6", "sweep demo_tiny --dry-run", None),
        ("p:13", "node-check --json n.json", "cluster"),
        ("p:14", "train 'hydra.searchpath=[file:///x]' eval=mine", "user files"),
    ]


def test_a_command_that_does_not_compose_fails(stopped):
    with pytest.raises(ConfigError, match="method.r|rank|r must"):
        check(["train", "method=lora", "method.r=0"], None, stopped)
    with pytest.raises(AssertionError, match="returned 2"):  # the CLI's one-line error
        check(["eval", "eval=mine"], None, stopped)


def test_readme_stays_short():
    """The README is a pitch, the two commands, the demo in brief and where to go next; the
    rest lives in docs/ (issue 27: at most 250 lines)."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
