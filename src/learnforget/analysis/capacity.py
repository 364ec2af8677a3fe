"""The learning positive control: recall of generated facts (data=facts) and bits learned per
trainable parameter.

    rows = recall_table([Path("runs/facts/<full run>"), Path("runs/facts/<lora r1 run>"), ...])

A fact is recalled when its true value has the highest log-likelihood among the K values
after the prompt, each value scored as its response tokens after the prompt tokens (each
tokenized alone, exactly as training renders the pair: learnforget.data.packing). Chance is
1/K. Recall is measured on the trained facts and, as a check, on the held-out facts (never
trained: chance expected).

Bits learned (stated with every table):

    bits = N · max(0, (recall - 1/K) / (1 - 1/K)) · log2 K

the chance-adjusted recall times the information of the trained facts (N·log2 K bits: each
value is uniform over K given the name). Beside it a lower bound on the information the
model's answers carry about the values, by Fano's inequality with p = recall:

    fano_bits = N · max(0, log2 K - h2(p) - (1 - p)·log2(K - 1))

Recall counts a fact only when its value wins the argmax; what a model stores about the values
short of that shows in their likelihood. So, third, the bits the model's likelihood saves over
the uniform code (the measure behind the ~2 bits/parameter anchor, which counts bits from the
model's loss on each attribute against its uniform entropy):

    ll_bits = sum over the N facts of (log2 K + log2 q_i)

q_i being the true value's probability among the K values (a softmax over their summed
log-likelihoods after the prompt). 0 for a model that knows nothing (q = 1/K) or only the
values' marginal, N·log2 K for one certain of every value; it can be negative (confidently
wrong), so held-out facts check it (expected <= 0).

Per trainable parameter, the bits sit beside the ~2 bits/parameter of Allen-Zhu & Li
(Physics of Language Models 3.3). Full finetuning against each LoRA run: the paired change of
recall over the same trained facts with the harness's paired bootstrap interval
(learnforget.eval.paired.paired_change).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learnforget.errors import ConfigError


def h2(p: float) -> float:
    """Binary entropy in bits."""
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def bits_learned(recall: float, n: int, k: int) -> float:
    """N · max(0, (recall - 1/K) / (1 - 1/K)) · log2 K (module doc)."""
    chance = 1.0 / k
    return n * max(0.0, (recall - chance) / (1.0 - chance)) * math.log2(k)


def fano_bits(recall: float, n: int, k: int) -> float:
    """N · max(0, log2 K - h2(p) - (1 - p)·log2(K - 1)), p = recall (module doc)."""
    return n * max(0.0, math.log2(k) - h2(recall) - (1.0 - recall) * math.log2(k - 1))


@torch.no_grad()
def value_loglik(model, tokenizer, prompts: Sequence[str], values: Sequence[str],
                 batch_size: int = 512) -> np.ndarray:
    """(len(prompts), len(values)) summed log-likelihood of each response `values[j]` after
    `prompts[i]`, the two tokenized separately and concatenated (as IFT training does)."""
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    v_ids = tokenizer(list(values), add_special_tokens=False)["input_ids"]
    if any(len(v) == 0 for v in v_ids):
        raise ConfigError("a fact value tokenizes to no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = [(i, j) for i in range(len(p_ids)) for j in range(len(v_ids))]
    out = np.zeros((len(p_ids), len(v_ids)))
    device = next(model.parameters()).device
    model.eval()
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        seqs = [p_ids[i] + v_ids[j] for i, j in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, q in enumerate(seqs):  # right padding: positions stay those of training
            ids[r, :len(q)] = torch.tensor(q)
            mask[r, :len(q)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        # log p(token t+1 | ..t) for every position, only at the gathered targets
        tgt = ids[:, 1:].to(device)
        lp = (logits[:, :-1].gather(2, tgt[..., None]).squeeze(-1)
              - torch.logsumexp(logits[:, :-1], dim=-1))
        sel = torch.zeros_like(lp, dtype=torch.bool)
        for r, (i, j) in enumerate(chunk):  # the value's tokens: positions a..b-1 predicted
            a = len(p_ids[i])                 # from a-1..b-2
            sel[r, a - 1:a - 1 + len(v_ids[j])] = True
        sums = (lp * sel).sum(dim=1).cpu().numpy()
        for r, (i, j) in enumerate(chunk):
            out[i, j] = sums[r]
    return out


def recall_items(model, tokenizer, pairs: Sequence[tuple[str, str]], values: Sequence[str],
                 prompt_template: str = "{prompt}") -> dict[str, list]:
    """Per-fact records of argmax recall over `values` (chance 1/K): doc_id, correct, and
    saving = log2 K + log2 q (bits; module doc)."""
    prompts = [prompt_template.format(prompt=p) for p, _ in pairs]
    index = {v: j for j, v in enumerate(values)}
    try:
        gold = np.array([index[r] for _, r in pairs])
    except KeyError as e:
        raise ConfigError(f"fact value {e.args[0]!r} is not one of the K values") from None
    ll = value_loglik(model, tokenizer, prompts, values)
    correct = (ll.argmax(axis=1) == gold).astype(float)
    logq = ll[np.arange(len(gold)), gold] - np.logaddexp.reduce(ll, axis=1)  # ln q_i
    saving = math.log2(len(values)) + logq / math.log(2.0)
    return {"doc_id": list(range(len(pairs))), "correct": correct.tolist(),
            "saving": saving.tolist()}


def score_run(run_dir: Path, checkpoint: str | None = None, cache_dir: Path | None = None
              ) -> dict[str, Any]:
    """Recall of a data=facts run's last (or named) checkpoint on its trained and held-out
    facts, with bits learned and the trainable parameter count from run.json."""
    from omegaconf import OmegaConf

    from learnforget.assets.models import load_tokenizer
    from learnforget.data.facts import fact_values
    from learnforget.data.sources import load_records, split_records
    from learnforget.eval.scoring import load_for_eval
    from learnforget.methods.registry import uses
    from learnforget.runfolder import RunFolder

    folder = RunFolder(Path(run_dir).resolve())
    if not folder.config.exists():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = OmegaConf.load(folder.config)
    if cfg.data.get("generator") != "facts":
        raise ConfigError(f"{run_dir} was not trained on data=facts (data={cfg.data.name})")
    ckpts = folder.checkpoint_dirs()
    if checkpoint:
        ckpts = [c for c in ckpts if c.name == checkpoint]
    if not ckpts:
        raise ConfigError(f"{run_dir} has no checkpoint {checkpoint or ''} (train it first)")
    k = int(cfg.data.facts_values)
    values = [f" {v}" for v in fact_values(k)]
    train, held = split_records(load_records(cfg.data), int(cfg.data.heldout_docs))
    cache = Path(cache_dir or cfg.paths.cache_dir).expanduser()
    model = load_for_eval(cfg, ckpts[-1], cache, "cpu")
    tok = load_tokenizer(str(folder.tokenizer))
    template = str(cfg.data.prompt_template)
    items = recall_items(model, tok, train, values, template)
    held_items = recall_items(model, tok, held, values, template) if held else None
    record = folder.read_record()
    params = record.train.trainable_params if record else None
    n, rec = len(train), float(np.mean(items["correct"]))
    out = {"run": folder.path.name, "checkpoint": ckpts[-1].name, "method": cfg.method.name,
           "r": cfg.method.get("r") if "r" in uses(cfg.method) else None,
           "n_facts": n, "k": k, "facts_offset": int(cfg.data.get("facts_offset") or 0),
           "info_bits": n * math.log2(k), "recall": rec,
           "chance": 1.0 / k, "bits": bits_learned(rec, n, k),
           "fano_bits": fano_bits(rec, n, k), "trainable_params": params,
           "heldout_recall": (float(np.mean(held_items["correct"])) if held_items else None),
           "ll_bits": float(np.sum(items["saving"])),
           "heldout_ll_bits_per_fact": (float(np.mean(held_items["saving"])) if held_items
                                        else None),
           "items": items}
    out["bits_per_param"] = out["bits"] / params if params else None
    out["ll_bits_per_param"] = out["ll_bits"] / params if params else None
    return out
