"""The drift suite's reference texts: general prompts shipped with the project
(``assets/drift_prompts.json``) and the base model's continuations of them, generated once
per base model and settings and cached beside the base scores.

Greedy and sampled continuations (again on the chat-formatted prompt when the tokenizer has a
chat template), in batched left-padded ``generate`` calls (greedy and sampled rows together);
sampling uses Gumbel-max with a generator per text, so a text does not depend on its batch.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from learnforget.errors import ConfigError
from learnforget.files import atomic_write_text, file_lock, read_result
from learnforget.runfolder import base_dir

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "assets" / "drift_prompts.json"
FORMAT_VERSION = 2  # 2: batched generation, Gumbel-max sampling with a generator per text


GENERATION_BATCH = 16  # texts per batched generate call (fixed: part of what makes the texts)
PLAIN_VARIANTS = ("greedy", "sampled")
CHAT_VARIANTS = ("chat_greedy", "chat_sampled")
VARIANTS = PLAIN_VARIANTS + CHAT_VARIANTS


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
    atomic_write_text(Path(path), json.dumps(refs, separators=(",", ":")) + "\n")


def load_references(path: Path) -> dict[str, Any] | None:
    """The saved references, or None when there is no file or it does not parse (then with a
    warning: the caller generates them again)."""
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
