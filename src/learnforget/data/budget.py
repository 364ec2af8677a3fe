"""What a job's token budget asks of its corpus, known without loading anything: the dry run's
data table (``learnforget sweep STUDY --dry-run``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from learnforget.data.shards import accounting, corpus_dir, data_format, read_manifest


def _tokens_text(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def budget_report(cfg: Any, ranks: int = 1) -> dict[str, Any]:
    """What a job's budget asks of its corpus, known without loading anything: budget tokens
    (the last checkpoint), the corpus's training tokens (from the shard manifest when the
    corpus is prepared; the size the paper reports otherwise), unique and repeated tokens."""
    t, d = cfg.train, cfg.data
    at = max(float(a) for a in t.checkpoints.at)
    per_step = int(t.batch_size) * int(t.grad_accum) * ranks
    unit = str(t.checkpoints.unit)
    budget = at if unit == "tokens" else at * per_step * int(t.seq_len) if unit == "steps" \
        else None
    fmt = data_format(d)
    max_docs = d.get("max_docs")
    row: dict[str, Any] = {"data": str(d.name), "format": fmt, "budget_tokens": budget,
                           "corpus_tokens": None, "unique_tokens": None, "repeated_tokens": None,
                           "exceeds": None, "note": ""}
    notes = []
    if max_docs is not None:
        notes.append(f"data.max_docs={max_docs}: the corpus is cut at {max_docs} documents")
    if fmt == "shards":
        folder = corpus_dir(Path(str(cfg.paths.cache_dir)), d, cfg.model)
        m = read_manifest(folder)
        if m and m.get("complete"):
            row["corpus_tokens"] = int(m["n_train_tokens"])
            notes.append(f"prepared: {len(m['shards'])} shard(s), sha256 {m['checksum'][:12]}")
        else:
            expected = d.get("expected_tokens")
            so_far = sum(e["tokens"] for e in m["shards"]) if m else 0
            notes.append("unknown until prepared" + (f" ({_tokens_text(so_far)} so far)" if m else "")
                         + (f"; the paper reports {_tokens_text(float(expected))} tokens"
                            if expected else ""))
    else:
        notes.append("in memory: token count known once loaded")
    if row["corpus_tokens"] is not None and budget is not None:
        seq = int(t.seq_len)
        blocks = row["corpus_tokens"] // seq
        acc = accounting(blocks, int(math.ceil(budget / seq)), seq)
        row.update(unique_tokens=acc["unique_tokens"], repeated_tokens=acc["repeated_tokens"],
                   exceeds=acc["budget_exceeds_corpus"])
    elif fmt == "shards" and d.get("expected_tokens") and budget is not None:
        row["exceeds"] = budget > float(d.expected_tokens)
        row["exceeds_basis"] = "paper"
    row["note"] = "; ".join(notes)
    return row


def format_budget_rows(rows: list[dict[str, Any]], indices: list[int]) -> str:
    lines = ["data per job: budget = tokens to the last checkpoint; corpus = training tokens of "
             "the prepared shards (else the paper's figure, in the note); unique/repeated = "
             "what the budget reads of the corpus",
             f"{'#':>3}  {'data':<18} {'format':<7} {'budget':>8} {'corpus':>8} {'unique':>8} "
             f"{'repeated':>8}  {'exceeds':<8} note   (* against the size the paper reports)"]
    for i, r in zip(indices, rows, strict=True):
        ex = "-" if r["exceeds"] is None else ("YES" if r["exceeds"] else "no")
        ex += "*" if r.get("exceeds_basis") == "paper" else ""
        lines.append(f"{i:>3}  {r['data']:<18} {r['format']:<7} {_tokens_text(r['budget_tokens']):>8} "
                     f"{_tokens_text(r['corpus_tokens']):>8} {_tokens_text(r['unique_tokens']):>8} "
                     f"{_tokens_text(r['repeated_tokens']):>8}  {ex:<8} {r['note']}")
    return "\n".join(lines)


# tokens per trainable parameter of the paper's code CPT at 20B tokens on Llama-2-7B (all-linear
# LoRA, 2,498,560 parameters per unit of rank): the regime anchors printed beside a run's own
PAPER_REGIME = "the paper's code CPT at 20B tokens: ~500 at LoRA r=16, ~30 at r=256"


def tokens_per_param(cfg: Any, trainable: int | None) -> float | None:
    """The regime of a run: tokens to its last budget per trainable parameter; None where
    either is unknown (epoch budgets without a known corpus size)."""
    budget = budget_report(cfg).get("budget_tokens")
    return float(budget) / trainable if budget and trainable else None


def regime_note(cfg: Any, trainable: int | None, tokens: int | None = None) -> str | None:
    """run.json's note on the regime: the budget's tokens (or `tokens`, the tokens the run saw,
    where the budget is not known in tokens: epochs) per trainable parameter; None when
    neither is known."""
    budget = budget_report(cfg).get("budget_tokens")
    what = "tokens to the last budget"
    if not budget:
        budget, what = tokens, "tokens seen"
    if not budget or not trainable:
        return None
    return (f"regime: {budget:,.0f} {what} / {trainable:,} trainable parameters = "
            f"{budget / trainable:.4g} tokens per trainable parameter ({PAPER_REGIME})")
