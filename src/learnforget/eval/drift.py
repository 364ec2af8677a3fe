"""Drift from the base model: a forgetting measure that moves early in small runs.

Benchmark accuracy and general-text loss barely move in a short CPU run (see the CPU probe
notes); how far a checkpoint's next-token distribution has moved away from its base model's
does. For a fixed set of general prompts shipped with the project
(``assets/drift_prompts.json``), the base model writes reference texts once (greedy and
sampled continuations; again on the chat-formatted prompt when the tokenizer has a chat
template). Each checkpoint is then scored on those texts, over the continuation tokens only:

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

    settings = drift.settings_from(ev.drift)
    refs = drift.cached_references(path, base_model, tokenizer, settings, model_id=...)
    result = drift.drift_scores(base_model, model, refs, batch_size=settings["batch_size"],
                                n_boot=settings["n_boot"], ci=settings["ci"],
                                boot_seed=settings["seed"])
    row.update(drift.summary_row(result))
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learnforget.errors import ConfigError
from learnforget.runfolder import base_dir

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "assets" / "drift_prompts.json"
FORMAT_VERSION = 2  # 2: batched generation, Gumbel-max sampling with a generator per text
BASE_CACHE_BYTES = 1 << 30  # base log-probs kept between checkpoints, at most
GENERATION_BATCH = 16  # texts per batched generate call (fixed: part of what makes the texts)
PLAIN_VARIANTS = ("greedy", "sampled")
CHAT_VARIANTS = ("chat_greedy", "chat_sampled")
VARIANTS = PLAIN_VARIANTS + CHAT_VARIANTS
METRICS = ("kl", "ce", "base_ce", "delta_ce")

# Every setting of the suite, with its default (conf/eval/*.yaml `drift:` block).
DEFAULTS: dict[str, Any] = {
    "n_prompts": 32,           # a seeded subset of the shipped prompts (null: all 64)
    "prompt_seed": 0,          # which subset
    "max_new_tokens": 64,      # length of each reference continuation
    "samples_per_prompt": 4,   # sampled continuations per prompt (besides the greedy one)
    "temperature": 1.0,        # 1.0 / 1.0: samples from the base model's own distribution
    "top_p": 1.0,
    "seed": 0,                 # sampling and bootstrap seed
    "chat": True,              # also chat-formatted prompts when the tokenizer has a template
    "template": "{prompt}\n",  # how a prompt is written in the plain (non-chat) variants
    "batch_size": 8,           # texts per forward pass when scoring
    "n_boot": 1000,            # bootstrap resamples over prompts
    "ci": 0.95,                # confidence level of the percentile interval
}
# Settings that change the reference texts (the rest only change how they are scored).
REFERENCE_KEYS = ("n_prompts", "prompt_seed", "max_new_tokens", "samples_per_prompt",
                  "temperature", "top_p", "seed", "chat", "template")


# ------------------------------------------------------------------ prompts

def load_prompts(n: int | None = None, seed: int = 0, path: Path | None = None) -> list[str]:
    """The shipped general prompts; with `n`, the first `n` of a seeded permutation (so the
    subset is reproducible, and a smaller subset is contained in a larger one)."""
    doc = json.loads(Path(path or PROMPTS_FILE).read_text())
    prompts = [str(p) for p in doc["prompts"]]
    if len(set(prompts)) != len(prompts):
        raise ConfigError(f"{path or PROMPTS_FILE}: duplicate prompts")
    if n is None:
        return prompts
    if not 1 <= int(n) <= len(prompts):
        raise ConfigError(f"drift.n_prompts={n}: expected 1..{len(prompts)} (the size of the "
                          "shipped prompt set) or null for all")
    order = list(range(len(prompts)))
    random.Random(int(seed)).shuffle(order)
    return [prompts[i] for i in order[:int(n)]]


def settings_from(cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS overridden by a config block (a dict or DictConfig); unknown keys fail."""
    out = dict(DEFAULTS)
    if cfg is not None:
        given = dict(cfg.items())
        given.pop("enabled", None)
        unknown = sorted(set(given) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"eval.drift: unknown key(s) {unknown} (expected "
                              f"{sorted(DEFAULTS)})")
        out.update(given)
    if int(out["samples_per_prompt"]) < 0 or int(out["max_new_tokens"]) < 1:
        raise ConfigError("eval.drift: samples_per_prompt must be >= 0 and max_new_tokens >= 1")
    if not 0 < float(out["ci"]) < 1:
        raise ConfigError(f"eval.drift.ci={out['ci']}: expected a level in (0, 1)")
    return out


# ------------------------------------------------------------------ reference texts

def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return [int(e) for e in eos if e is not None]


def _cut(ids: list[int], eos: list[int]) -> list[int]:
    """A continuation up to and including its first EOS (generate pads after it)."""
    for j, t in enumerate(ids):
        if t in eos:
            return ids[:j + 1]
    return ids


def _sample_seed(seed: int, prefix: str, prompt: str) -> int:
    """A per-prompt sampling seed from the prompt's text, so a prompt gets the same samples
    in every subset that contains it."""
    digest = hashlib.sha256(f"{int(seed)}|{prefix}|{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def chat_template_hash(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    blob = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _RowSampler:
    """A logits processor that turns greedy decoding into sampling, row by row: each row with
    a generator gets Gumbel noise from its own generator added to its (temperature-scaled,
    top-p-filtered) scores, so its argmax is a draw from the sampling distribution (the
    Gumbel-max trick). Rows without one stay greedy. A row's draws depend only on its own
    generator, not on which other rows share its batch."""

    def __init__(self, generators: Sequence[torch.Generator | None], temperature: float,
                 top_p: float):
        self.generators, self.temperature, self.top_p = list(generators), temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for r, gen in enumerate(self.generators):
            if gen is None:
                continue
            s = scores[r].float() / self.temperature
            if self.top_p < 1.0:
                probs, order = torch.sort(torch.softmax(s, -1), descending=True)
                drop = probs.cumsum(-1) - probs >= self.top_p  # keeps the top token at least
                s[order[drop]] = float("-inf")
            u = torch.rand(s.shape[-1], generator=gen, dtype=torch.float64).clamp_min(1e-300)
            scores[r] = s + (-torch.log(-torch.log(u))).to(s.device, s.dtype)
        return scores


@torch.no_grad()
def generate_references(base_model, tokenizer, prompts: Sequence[str], *,
                        max_new_tokens: int = DEFAULTS["max_new_tokens"],
                        samples_per_prompt: int = DEFAULTS["samples_per_prompt"],
                        temperature: float = DEFAULTS["temperature"],
                        top_p: float = DEFAULTS["top_p"], seed: int = DEFAULTS["seed"],
                        chat: bool = DEFAULTS["chat"],
                        template: str = DEFAULTS["template"]) -> dict[str, Any]:
    """The base model's own texts for each prompt: one greedy and `samples_per_prompt`
    sampled continuations, for the plain prompt (`template`) and, with `chat`, the
    chat-formatted user turn. Every text is one row of a batched, left-padded `generate`
    (GENERATION_BATCH rows at a time, grouped by prompt length); a sampled row draws from its
    own generator, seeded from the seed, format, prompt text and sample number, so a prompt
    gets the same samples in every subset that contains it. Token ids are stored (prompt and
    continuation, each continuation up to and including its EOS), so scoring needs no
    re-tokenisation; the result is JSON-serialisable."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, LogitsProcessorList

    if not (float(temperature) > 0 and 0 < float(top_p) <= 1):
        raise ConfigError(f"eval.drift: temperature={temperature} must be > 0 and "
                          f"top_p={top_p} in (0, 1]")
    was_training = base_model.training
    base_model.eval()
    device = next(base_model.parameters()).device
    eos = _eos_ids(base_model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    cfg = GenerationConfig(do_sample=False, max_new_tokens=int(max_new_tokens),
                           eos_token_id=eos, pad_token_id=pad)
    formats: dict[str, Callable[[str], list[int]]] = {
        "": lambda p: tokenizer(template.format(prompt=p))["input_ids"]}
    has_template = chat_template_hash(tokenizer) is not None
    if chat and has_template:
        def chat_ids(p: str) -> list[int]:
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                 add_generation_prompt=True, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        formats["chat_"] = chat_ids
    chat_info = {"used": "chat_" in formats,
                 "reason": None if "chat_" in formats else
                 ("chat=false" if not chat else "the tokenizer has no chat template")}
    # one row per text, in the stored order: per format, per prompt, greedy then the samples
    texts: list[dict[str, Any]] = []
    seeds: list[int | None] = []
    for prefix, encode in formats.items():
        for i, prompt in enumerate(prompts):
            ids = [int(t) for t in encode(prompt)]
            for j in range(1 + max(0, int(samples_per_prompt))):
                texts.append({"variant": f"{prefix}{'sampled' if j else 'greedy'}",
                              "prompt_index": i, "prompt_ids": ids})
                seeds.append(_sample_seed(seed, f"{prefix}{j}", prompt) if j else None)
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]["prompt_ids"]))
    t0 = time.perf_counter()
    try:
        bar = tqdm(total=len(texts), desc="drift references", disable=None)
        for b in range(0, len(order), GENERATION_BATCH):
            rows = order[b:b + GENERATION_BATCH]
            width = max(len(texts[k]["prompt_ids"]) for k in rows)
            x = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, k in enumerate(rows):  # left padding: every prompt ends at the last column
                n = len(texts[k]["prompt_ids"])
                x[r, width - n:] = torch.tensor(texts[k]["prompt_ids"])
                mask[r, width - n:] = 1
            gens = [None if seeds[k] is None else torch.Generator().manual_seed(seeds[k])
                    for k in rows]
            sampler = _RowSampler(gens, float(temperature), float(top_p))
            out = base_model.generate(x.to(device), attention_mask=mask.to(device),
                                      generation_config=cfg,
                                      logits_processor=LogitsProcessorList([sampler]))
            for r, k in enumerate(rows):
                texts[k]["continuation_ids"] = _cut(out[r, width:].tolist(), eos)
            bar.update(len(rows))
        bar.close()
    finally:
        base_model.train(was_training)
    return {
        "format_version": FORMAT_VERSION,
        "settings": {"max_new_tokens": int(max_new_tokens),
                     "samples_per_prompt": int(samples_per_prompt),
                     "temperature": float(temperature), "top_p": float(top_p),
                     "seed": int(seed), "chat": bool(chat), "template": template},
        "chat": chat_info,
        "chat_template_sha": chat_template_hash(tokenizer),
        "prompts": list(prompts),
        "texts": texts,
        "generation_s": round(time.perf_counter() - t0, 2),
    }


def save_references(refs: Mapping[str, Any], path: Path) -> None:
    """Write atomically (temporary file beside `path`, then os.replace)."""
    from learnforget.files import atomic_write_text

    atomic_write_text(Path(path), json.dumps(refs, separators=(",", ":")) + "\n")


def load_references(path: Path) -> dict[str, Any] | None:
    """The saved references, or None when there is no file or it does not parse (then with a
    warning: the caller generates them again)."""
    from learnforget.files import read_result

    return read_result(Path(path))


def reference_key(settings: Mapping[str, Any], tokenizer, model_id: str) -> str:
    """Hash of what defines the reference texts: base model, prompt set, generation settings
    and tokenizer (vocabulary and chat template)."""
    prompts = load_prompts(settings["n_prompts"], settings["prompt_seed"])
    blob = json.dumps({"model": model_id, "format": FORMAT_VERSION,
                       "settings": {k: settings[k] for k in REFERENCE_KEYS},
                       "prompts": prompts, "vocab": len(tokenizer),
                       "chat_template": chat_template_hash(tokenizer)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def references_path(runs_root: Path, model_id: str, key: str) -> Path:
    """Where the eval stage caches them: beside the base scores."""
    return base_dir(runs_root, model_id) / f"drift-refs-{key[:12]}.json"


def cached_references(path: Path, base_model, tokenizer, settings: Mapping[str, Any], *,
                      model_id: str) -> dict[str, Any]:
    """Load the references at `path` if they were made with these settings, else generate
    them with `base_model` and save them there (under a file lock: one writer)."""
    from learnforget.files import file_lock

    key = reference_key(settings, tokenizer, model_id)
    path = Path(path)
    with file_lock(path.with_suffix(".lock")):
        refs = load_references(path)
        if refs and refs.get("key") == key:
            return refs
        print(f"learnforget: generating drift reference texts with the base model {model_id} "
              "(cached after)")
        refs = generate_references(
            base_model, tokenizer, load_prompts(settings["n_prompts"], settings["prompt_seed"]),
            max_new_tokens=settings["max_new_tokens"],
            samples_per_prompt=settings["samples_per_prompt"],
            temperature=settings["temperature"], top_p=settings["top_p"],
            seed=settings["seed"], chat=settings["chat"], template=settings["template"])
        refs = {"key": key, "model": model_id, **refs}
        save_references(refs, path)
        return refs


# ------------------------------------------------------------------ scoring

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
