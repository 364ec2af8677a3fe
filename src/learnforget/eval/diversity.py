"""Generation diversity (Biderman et al. 2024, fig. 5): unique completions among a sampled
HumanEval task's n samples per problem, counted among all, passing and failing samples.

A sampled humaneval task with `diversity: exact` (or `stripped`) keeps its completions in the
checkpoint's eval result (`generations`, one record per problem) and the counts made from them
(`diversity`). The completions are lm-eval's own (the sampled task's `resps`: the generated text,
cut before the first of the task's `until` sequences, which is not included); each distinct
completion is run once in the sandbox, with the problem's tests, and its result counts for every
copy (the pass@k metric's run, remembered: `humaneval_utils.remembered_results`).

What counts as the same completion (`MODES`):
- ``exact``: identical strings (the paper's "unique strings"), whitespace included.
- ``stripped``: identical after removing trailing spaces and tabs from each line and trailing
  newlines from the end (differences Python does not see outside string literals); leading
  whitespace (indentation) and blank lines inside the completion still count.

A generation record: {"doc_id", "task_id", "texts" (the distinct completions, in order of first
appearance), "passed" (per text), "order" (per sample, the index of its text)}: every sample in
order, so counts in either mode are made again from it (`recount`).
Per problem: n, n_pass, unique (distinct completions), unique_pass (distinct among passing
samples), unique_fail (among failing ones). With `stripped`, two texts that differ only in
trailing whitespace and not in their result count once each among pass and fail, so unique_pass
+ unique_fail can exceed unique; with `exact` they add up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from learnforget.errors import ConfigError

MODES = ("exact", "stripped")
COUNTS = ("unique", "unique_pass", "unique_fail")


def normalise(text: str, mode: str) -> str:
    """The string compared for uniqueness (module doc)."""
    if mode == "exact":
        return text
    if mode == "stripped":
        return "\n".join(line.rstrip(" \t") for line in text.split("\n")).rstrip("\n")
    raise ConfigError(f"diversity mode {mode!r} is unknown (expected one of: {', '.join(MODES)})")


def problem_counts(completions: Sequence[str], passed: Sequence[bool], mode: str) -> dict:
    """One problem's counts from its samples' completions and results (module doc)."""
    if len(completions) != len(passed):
        raise ValueError(f"{len(completions)} completions but {len(passed)} results")
    keys = [normalise(c, mode) for c in completions]
    return {"n": len(keys), "n_pass": int(sum(bool(p) for p in passed)),
            "unique": len(set(keys)),
            "unique_pass": len({k for k, p in zip(keys, passed, strict=True) if p}),
            "unique_fail": len({k for k, p in zip(keys, passed, strict=True) if not p})}


def generation_record(doc_id: int, task_id: str, completions: Sequence[str],
                      passed_by_text: Mapping[str, bool]) -> dict[str, Any]:
    """The stored form of one problem's samples (module doc)."""
    texts = list(dict.fromkeys(completions))
    index = {t: i for i, t in enumerate(texts)}
    return {"doc_id": int(doc_id), "task_id": str(task_id), "texts": texts,
            "passed": [bool(passed_by_text[t]) for t in texts],
            "order": [index[c] for c in completions]}


def samples_of(record: Mapping[str, Any]) -> tuple[list[str], list[bool]]:
    """Every sample's completion and result, in order, from a generation record."""
    texts, passed = record["texts"], record["passed"]
    return [texts[i] for i in record["order"]], [bool(passed[i]) for i in record["order"]]


def recount(generations: Sequence[Mapping[str, Any]], mode: str) -> dict[str, Any]:
    """The diversity result of stored generations: per problem and means over problems."""
    problems = []
    for rec in generations:
        completions, passed = samples_of(rec)
        problems.append({"doc_id": int(rec["doc_id"]), "task_id": rec["task_id"],
                         **problem_counts(completions, passed, mode)})
    out: dict[str, Any] = {"mode": mode, "n_problems": len(problems),
                           "samples": problems[0]["n"] if problems else None,
                           "problems_with_pass": sum(1 for p in problems if p["n_pass"]),
                           "problems": problems}
    for key in COUNTS:
        out[f"mean_{key}"] = (sum(p[key] for p in problems) / len(problems)) if problems \
            else None
    return out


def from_logged_samples(logged: Sequence[Mapping[str, Any]], mode: str,
                        results: Callable[[Sequence[str], str], list[bool]]
                        ) -> tuple[list[dict], dict[str, Any]]:
    """(generations, diversity) of a sampled humaneval task from lm-eval's per-sample log
    (one entry per problem: `resps` [[n completions]], `filtered_resps` [[n programs]] from the
    create_test filter, `target` the tests). `results(programs, test)`: each program's
    pass/fail (humaneval_utils.program_results)."""
    generations = []
    for s in sorted(logged, key=lambda x: int(x["doc_id"])):
        (completions,) = s["resps"]
        (programs,) = s["filtered_resps"]
        if len(completions) != len(programs):
            raise ValueError(f"doc {s['doc_id']}: {len(completions)} completions but "
                             f"{len(programs)} programs")
        ok = results(list(programs), s["target"])
        passed_by_text: dict[str, bool] = {}
        for c, p in zip(completions, ok, strict=True):
            passed_by_text.setdefault(c, bool(p))
        generations.append(generation_record(int(s["doc_id"]), s["doc"]["task_id"],
                                             list(completions), passed_by_text))
    return generations, recount(generations, mode)
