"""Drift from the base model: a forgetting measure that moves early in small runs.

Benchmark accuracy and general-text loss barely move in a short CPU run (see the CPU probe
notes); how far a checkpoint's next-token distribution has moved away from its base model's
does. For a fixed set of general prompts shipped with the project
(``assets/drift_prompts.json``), the base model writes reference texts once (greedy and
sampled continuations; again on the chat-formatted prompt when the tokenizer has a chat
template; :mod:`learnforget.eval.drift_refs`). Each checkpoint is then scored on those texts, over the continuation tokens only:

* ``kl``: token-level KL(p_base || p_ckpt) over the full vocabulary, in nats per token;
* ``ce``: the checkpoint's cross-entropy on the base model's own text (``base_ce`` is the
  base model's, ``delta_ce`` = ce - base_ce);

per variant (``greedy``, ``sampled``, ``chat_greedy``, ``chat_sampled``, and ``all`` = the
per-prompt mean over the variants present), each as the mean over prompts of the per-prompt
token means, with a percentile-bootstrap confidence interval over prompts.

With temperature 1 and top_p 1 (the defaults), the mean of the summed token KL over sampled
texts is an unbiased estimate of the sequence-level KL(base || ckpt) of the continuations.

Cost: references are generated once per base model and settings, in batched left-padded
``generate`` calls (greedy and sampled rows together). Scoring runs the base model and the
checkpoint forward on every reference text. The base model's log-probabilities on them are
kept in memory for the next checkpoint of the same eval stage while they fit in
BASE_CACHE_BYTES (SmolLM2: 49,152 x 4 bytes per token, 200 MB for the demo's 32 texts x 32
tokens; the default suite's 320 texts x 64 tokens, 4 GB, are recomputed instead).

Typical use (the eval stage)::

    settings = drift_refs.settings_from(ev.drift)
    refs = drift_refs.cached_references(path, base_model, tokenizer, settings, model_id=...)
    result = drift.drift_scores(base_model, model, refs, batch_size=settings["batch_size"],
                                n_boot=settings["n_boot"], ci=settings["ci"],
                                boot_seed=settings["seed"])
    row.update(drift.summary_row(result))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learnforget.eval.drift_refs import (
    VARIANTS,
    cached_references,
    load_references,
    reference_key,
    references_path,
    settings_from,
)

BASE_CACHE_BYTES = 1 << 30  # base log-probs kept between checkpoints, at most


METRICS = ("kl", "ce", "base_ce", "delta_ce")


def _logits(model, ids: torch.Tensor, mask: torch.Tensor, strip_prefix: int) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits
    if strip_prefix:
        logits = logits[:, strip_prefix:, :]
    if logits.shape[1] != ids.shape[1]:
        raise ValueError(f"the model returned {logits.shape[1]} logit rows for {ids.shape[1]} "
                         "tokens: pass strip_prefix=<virtual tokens> for a prompt-tuning "
                         "PeftModel (evaluate.load_for_eval already strips them)")
    return logits.float()


@torch.no_grad()
def per_text_scores(base_model, model, refs: Mapping[str, Any], *, batch_size: int = 8,
                    strip_prefix: int = 0, base_strip_prefix: int = 0,
                    base_cache: dict | None = None) -> list[dict[str, Any]]:
    """For every reference text, sums over its continuation tokens of KL(base || model),
    the model's CE and the base model's CE, and the token count. Both models run in eval
    mode, without gradients, logits in fp32; `model is base_model` reuses one forward.
    `base_cache`: a dict kept between calls with the same base model and references; the base
    log-probabilities are stored there (up to BASE_CACHE_BYTES) and reused."""
    texts = refs["texts"]
    device = next(model.parameters()).device
    base_device = next(base_model.parameters()).device
    modes = (base_model.training, model.training)
    base_model.eval()
    model.eval()
    out: list[dict[str, Any] | None] = [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda j: -(len(texts[j]["prompt_ids"])
                                                       + len(texts[j]["continuation_ids"])))
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            seqs = [texts[j]["prompt_ids"] + texts[j]["continuation_ids"] for j in idx]
            width = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            rows, cols, targets = [], [], []
            for r, (j, s) in enumerate(zip(idx, seqs, strict=True)):
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
                start, n = len(texts[j]["prompt_ids"]), len(texts[j]["continuation_ids"])
                # the logit at position t predicts token t + 1
                rows += [r] * n
                cols += range(start - 1, start - 1 + n)
                targets += s[start:start + n]
            rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
            tgt = torch.tensor(targets)
            key = (tuple(idx), batch_size, base_strip_prefix)
            lp_base = base_cache.get(key) if base_cache is not None else None
            if lp_base is None:
                lp_base = torch.log_softmax(
                    _logits(base_model, ids.to(base_device), mask.to(base_device),
                            base_strip_prefix)[rows_t.to(base_device),
                                               cols_t.to(base_device)].cpu(), dim=-1)
                size = lp_base.numel() * lp_base.element_size()
                if base_cache is not None and base_cache.get("bytes", 0) + size <= BASE_CACHE_BYTES:
                    base_cache[key] = lp_base
                    base_cache["bytes"] = base_cache.get("bytes", 0) + size
            if model is base_model and strip_prefix == base_strip_prefix:
                lp = lp_base
            else:
                lp = torch.log_softmax(
                    _logits(model, ids.to(device), mask.to(device),
                            strip_prefix)[rows_t.to(device), cols_t.to(device)].cpu(), dim=-1)
            # identical log-probs give exactly 0 (each term is p * 0)
            kl = (lp_base.exp() * (lp_base - lp)).sum(-1).double()
            ce = -lp.gather(-1, tgt[:, None])[:, 0].double()
            base_ce = -lp_base.gather(-1, tgt[:, None])[:, 0].double()
            for r, j in enumerate(idx):
                sel = rows_t == r
                out[j] = {"variant": texts[j]["variant"], "prompt_index": texts[j]["prompt_index"],
                          "n_tokens": int(sel.sum()), "kl": float(kl[sel].sum()),
                          "ce": float(ce[sel].sum()), "base_ce": float(base_ce[sel].sum())}
    finally:
        base_model.train(modes[0])
        model.train(modes[1])
    return out  # type: ignore[return-value]


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 1000, ci: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean (resampling the values with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(int(n_boot), len(v)))].mean(axis=1)
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def aggregate(per_text: Sequence[Mapping[str, Any]], *, n_boot: int = 1000, ci: float = 0.95,
              seed: int = 0) -> dict[str, Any]:
    """Per variant: per prompt, the token mean of each metric over its texts; then the mean
    over prompts with a bootstrap interval over prompts. `all` averages, per prompt, the
    variants present (prompts missing from a variant are skipped)."""
    sums: dict[str, dict[int, dict[str, float]]] = {}
    for t in per_text:
        acc = sums.setdefault(t["variant"], {}).setdefault(
            t["prompt_index"], {"n_tokens": 0, "kl": 0.0, "ce": 0.0, "base_ce": 0.0})
        for k in ("n_tokens", "kl", "ce", "base_ce"):
            acc[k] += t[k]
    per_prompt: dict[str, dict[int, dict[str, float]]] = {}
    for variant, prompts in sums.items():
        per_prompt[variant] = {}
        for i, acc in prompts.items():
            if acc["n_tokens"]:
                m = {k: acc[k] / acc["n_tokens"] for k in ("kl", "ce", "base_ce")}
                m["delta_ce"] = m["ce"] - m["base_ce"]
                per_prompt[variant][i] = m
    present = [v for v in VARIANTS if per_prompt.get(v)]
    present += sorted(v for v in per_prompt if v not in VARIANTS and per_prompt[v])
    if present:
        common = set.intersection(*(set(per_prompt[v]) for v in present))
        per_prompt["all"] = {i: {k: float(np.mean([per_prompt[v][i][k] for v in present]))
                                 for k in METRICS} for i in sorted(common)}
    result: dict[str, Any] = {}
    for variant in [*present, "all"] if present else []:
        pp = per_prompt[variant]
        keys = sorted(pp)
        entry: dict[str, Any] = {
            "n_prompts": len(keys),
            "n_texts": sum(1 for t in per_text if t["variant"] == variant)
            if variant != "all" else len(per_text),
            "n_tokens": sum(a["n_tokens"] for a in sums[variant].values())
            if variant != "all" else sum(t["n_tokens"] for t in per_text)}
        for metric in METRICS:
            vals = [pp[i][metric] for i in keys]
            lo, hi = bootstrap_ci(vals, n_boot=n_boot, ci=ci, seed=seed)
            entry[metric] = {"mean": float(np.mean(vals)), "ci_low": lo, "ci_high": hi}
        entry["prompt_indices"] = keys
        entry["per_prompt_kl"] = [pp[i]["kl"] for i in keys]
        result[variant] = entry
    return result


def drift_scores(base_model, model, refs: Mapping[str, Any], *, batch_size: int = 8,
                 strip_prefix: int = 0, n_boot: int = 1000, ci: float = 0.95,
                 boot_seed: int = 0, base_cache: dict | None = None) -> dict[str, Any]:
    """Drift of `model` from `base_model` on the reference texts: per variant (and `all`),
    mean KL(base || model), model CE, base CE and their difference (nats per token), each
    with a `ci` percentile-bootstrap interval over prompts (`n_boot` resamples, seeded).
    `strip_prefix`: logit rows to drop from `model`'s output (a raw prompt-tuning PeftModel;
    evaluate.load_for_eval's wrapper already drops them). `base_cache`: see per_text_scores."""
    t0 = time.perf_counter()
    per_text = per_text_scores(base_model, model, refs, batch_size=batch_size,
                               strip_prefix=strip_prefix, base_cache=base_cache)
    return {"variants": aggregate(per_text, n_boot=n_boot, ci=ci, seed=boot_seed),
            "chat": refs.get("chat"), "references_key": refs.get("key"),
            "n_boot": int(n_boot), "ci": float(ci), "boot_seed": int(boot_seed),
            "wall_time_s": time.perf_counter() - t0}


def paired_difference(a: Mapping[str, Any], b: Mapping[str, Any], *, variant: str = "all",
                      n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Mean KL of `a` minus `b` (two drift_scores results on the same references), with a
    percentile-bootstrap interval over prompts resampled jointly (paired): tighter than
    comparing the two intervals when the prompts' drifts are correlated."""
    ea, eb = a["variants"][variant], b["variants"][variant]
    if ea["prompt_indices"] != eb["prompt_indices"]:
        raise ValueError("the two results were not scored on the same prompts")
    diff = np.asarray(ea["per_prompt_kl"]) - np.asarray(eb["per_prompt_kl"])
    lo, hi = bootstrap_ci(diff, n_boot=n_boot, ci=ci, seed=seed)
    return {"mean": float(diff.mean()), "ci_low": lo, "ci_high": hi,
            "n_prompts": int(len(diff)), "a_larger_share": float((diff > 0).mean())}


def summary_row(scores: Mapping[str, Any]) -> dict[str, float]:
    """Flat columns for the eval summary: `drift_kl` (the `all` variant: the forgetting axis)
    with its interval, `drift_delta_ce`, and per variant `drift/<variant>/<metric>` for every
    metric, with `_lo`/`_hi` interval bounds for kl and delta_ce."""
    row: dict[str, float] = {}
    variants = scores.get("variants", {})
    if "all" in variants:
        a = variants["all"]
        row.update({"drift_kl": a["kl"]["mean"], "drift_kl_ci_low": a["kl"]["ci_low"],
                    "drift_kl_ci_high": a["kl"]["ci_high"],
                    "drift_delta_ce": a["delta_ce"]["mean"]})
    for variant, entry in variants.items():
        for metric in METRICS:
            row[f"drift/{variant}/{metric}"] = entry[metric]["mean"]
        for metric in ("kl", "delta_ce"):
            row[f"drift/{variant}/{metric}_lo"] = entry[metric]["ci_low"]
            row[f"drift/{variant}/{metric}_hi"] = entry[metric]["ci_high"]
    return row


# ------------------------------------------------------------------ eval-stage wiring

class DriftEval:
    """What the eval stage holds for one run: the settings (an `eval.drift` block), the base
    model (loaded on first use by `load_base`, then kept for every checkpoint) and its
    reference texts, cached at `references_path(runs_root, model_id, key)` beside the base
    scores. `score(model)` gives the drift of one checkpoint; `score(self.base_model)` is
    exactly 0 (one forward)."""

    def __init__(self, cfg: Mapping[str, Any] | None, *, model_id: str, runs_root: Path,
                 tokenizer, load_base: Callable[[], Any]):
        self.settings = settings_from(cfg)
        self.model_id, self.tokenizer, self._load_base = model_id, tokenizer, load_base
        self.key = reference_key(self.settings, tokenizer, model_id)
        self.path = references_path(runs_root, model_id, self.key)
        self._base: Any = None
        self._refs: dict[str, Any] | None = None
        self._base_cache: dict = {}  # the base model's log-probs, reused for every checkpoint

    @property
    def base_model(self):
        if self._base is None:
            self._base = self._load_base()
        return self._base

    @property
    def refs(self) -> dict[str, Any]:
        if self._refs is None:
            cached = load_references(self.path)
            self._refs = cached if cached and cached.get("key") == self.key else \
                cached_references(self.path, self.base_model, self.tokenizer, self.settings,
                                  model_id=self.model_id)
        return self._refs

    def score(self, model) -> dict[str, Any]:
        s = self.settings
        return drift_scores(self.base_model, model, self.refs, batch_size=int(s["batch_size"]),
                            n_boot=int(s["n_boot"]), ci=float(s["ci"]), boot_seed=int(s["seed"]),
                            base_cache=self._base_cache)
