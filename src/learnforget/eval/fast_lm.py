"""A faster lm-eval backend for multiple choice: each question's shared context is run once for
all its choices, several questions per forward pass (lm-eval model "lf-hf-shared", a subclass
of lm-eval's HFLM).

lm-eval's HFLM scores every (context, continuation) request as its own sequence, so a
4-choice question runs its context 4 times, and it computes LM-head logits and a full-vocabulary
log-softmax at every position. `SharedContextLM._loglikelihood_tokens` groups the requests whose
context tokens are identical (lm-eval's own tokenisation: `_encode_pair`) into a question and
packs each question into one row, [ctx, cont_1[:-1], cont_2[:-1], ...], with explicit
position_ids (every continuation's positions restart at len(ctx)) and a 4D attention mask (a
continuation attends to the context and to its own earlier tokens only), so each token sees
exactly what it sees in HFLM's sequence. The rows of several questions (longest first, padded
on the right) form one batch, and the model's own `logits_to_keep` (a boolean [batch, width]
mask, transformers >= 5) computes logits at the scored positions only: the context's last
token and the continuations' tokens. The log-likelihood and greedy flag of each continuation are
HFLM's (log-softmax in `softmax_dtype`, under HFLM's autocast; argmax of every scored position
equal to the continuation); only the order of floating-point work changes, so the values agree
with HFLM's to ~1e-6 in float32 (test_fast_lm.py requires 1e-4).

Batches: lm-eval's batch_size counts sequences; a batch here holds as many question rows as fit
in batch_size x (the longest request's HFLM input length) tokens of padded rows, i.e. never more
tokens than HFLM's own first (largest) batch, and at least one question.

Fallbacks to HFLM's own code: requests whose context no other request shares (winogrande's
choices, rolling log-likelihoods), sequences HFLM would truncate (context + continuation longer
than max_length + 1), empty contexts or continuations, and everything when the model cannot
take the packed form (not a causal LM, an attention implementation other than eager or sdpa, a
sliding window, no `position_ids` argument, or an error on the first try: `_sharing_failed`).
Generation and rolling log-likelihoods are HFLM's.

On `learnforget bench eval`'s items (SmolLM2-135M, 40 HellaSwag + 40 ARC-Challenge, batch 8)
HFLM runs 17,639 request tokens with logits at every one; this backend runs 8,933 tokens in 10
batches (8,207 + 8% padding) with logits at 5,143 positions.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

Request = tuple[tuple[str, str], list[int], list[int]]
Question = tuple[list[int], list[list[int]]]  # shared context tokens, continuations

_MASKABLE = ("eager", "sdpa")  # attention implementations that take a custom 4D float/bool mask


def packed_length(ctx: list[int], conts: list[list[int]]) -> int:
    """Tokens of a question's packed row: the context and every continuation but its last
    token (the last token of a continuation is only predicted, never input)."""
    return len(ctx) + sum(len(c) - 1 for c in conts)


def pack_rows(questions: list[Question], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, position_ids, allowed [batch, width, width] (query attends key) and keep
    [batch, width] (positions whose logits are scored) for `questions`, one row each, padded
    on the right. Each row is [ctx, cont_1[:-1], cont_2[:-1], ...]: continuation j's tokens sit
    at positions len(ctx).. and attend to the context and to continuation j's earlier tokens.
    Padding attends to the context and earlier padding, so no softmax row is empty."""
    width = max(packed_length(c, k) for c, k in questions)
    n = len(questions)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    seg = torch.full((n, width), -1, dtype=torch.long)  # 0 context, j continuation j, -1 pad
    keep = torch.zeros((n, width), dtype=torch.bool)
    for b, (ctx, conts) in enumerate(questions):
        n_ctx = len(ctx)
        ids[b, :n_ctx] = torch.tensor(ctx)
        pos[b, :n_ctx] = torch.arange(n_ctx)
        seg[b, :n_ctx] = 0
        keep[b, n_ctx - 1] = True
        at = n_ctx
        for j, cont in enumerate(conts, start=1):
            m = len(cont) - 1
            if m:
                ids[b, at:at + m] = torch.tensor(cont[:-1])
                pos[b, at:at + m] = torch.arange(n_ctx, n_ctx + m)
                seg[b, at:at + m] = j
                keep[b, at:at + m] = True
            at += m
    col = torch.arange(width)
    causal = col[None, :] <= col[:, None]  # [query, key]
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    return ids, pos, causal[None] & same, keep


def scored_rows(questions: list[Question], keep: torch.Tensor
                ) -> list[list[tuple[torch.Tensor, list[int]]]]:
    """For each question, for each continuation: the rows of the kept logits (flattened like
    `logits[keep]`) that predict its tokens, and the tokens."""
    flat = (torch.cumsum(keep.flatten(), 0) - 1).view(keep.shape)
    out = []
    for b, (ctx, conts) in enumerate(questions):
        first = int(flat[b, len(ctx) - 1])
        at, per = len(ctx), []
        for cont in conts:
            m = len(cont) - 1
            rows = torch.cat([torch.tensor([first]), flat[b, at:at + m]])
            per.append((rows, cont))
            at += m
        out.append(per)
    return out


@register_model("lf-hf-shared")
class SharedContextLM(HFLM):
    """HFLM that runs a question's shared context once for all its choices, packing several
    questions into each forward pass."""

    _sharing_failed = False

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        rest: list[int] = []
        packable = not self._sharing_failed and self._packing_supported()
        for i, (_, ctx, cont) in enumerate(requests):
            if (not packable or not ctx or not cont
                    or len(ctx) + len(cont) > self.max_length + 1):
                rest.append(i)
            else:
                groups.setdefault(tuple(ctx), []).append(i)
        for key in [k for k, idx in groups.items() if len(idx) < 2]:
            rest.extend(groups.pop(key))
        order = sorted(groups, key=lambda k: -packed_length(
            list(k), [requests[i][2] for i in groups[k]]))
        pbar = tqdm(total=sum(len(v) for v in groups.values()),
                    disable=disable_tqdm or self.rank != 0,
                    desc="Running shared-context loglikelihood requests")
        for batch in self._batches(order, groups, requests, override_bs):
            if self._sharing_failed:
                rest.extend(i for key in batch for i in groups[key])
                continue
            questions = [(list(key), [requests[i][2] for i in groups[key]]) for key in batch]
            try:
                results = self._score_packed(questions)
            except (TypeError, AttributeError, ValueError, RuntimeError, IndexError):
                self._sharing_failed = True  # the model takes no packed rows: HFLM's way
                rest.extend(i for key in batch for i in groups[key])
                continue
            for key, res in zip(batch, results, strict=True):
                for i, r in zip(groups[key], res, strict=True):
                    out[i] = r
                    if requests[i][0] is not None:  # as HFLM: rolling requests have no key
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
                    pbar.update(1)
        pbar.close()
        if rest:
            rest.sort()
            res = super()._loglikelihood_tokens([requests[i] for i in rest],
                                                disable_tqdm=disable_tqdm, override_bs=override_bs)
            for i, r in zip(rest, res, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]  # every index filled above

    def _batches(self, order: list[tuple[int, ...]], groups: dict[tuple[int, ...], list[int]],
                 requests: list[Request], override_bs: int | None) -> list[list[tuple[int, ...]]]:
        """Questions (longest row first) in batches of at most batch_size x the longest
        request's HFLM input length padded tokens, one question at least."""
        if not order:
            return []
        longest = max(len(requests[i][1]) + len(requests[i][2]) - 1
                      for idx in groups.values() for i in idx)
        size = self.batch_size if self.batch_size != "auto" else (
            override_bs or self._detect_batch_size(
                sorted((requests[i] for idx in groups.values() for i in idx),
                       key=lambda r: -len(r[1]) - len(r[2]))))
        budget = int(size) * longest
        batches: list[list[tuple[int, ...]]] = []
        width = 0
        for key in order:
            row = packed_length(list(key), [requests[i][2] for i in groups[key]])
            if batches and max(width, row) * (len(batches[-1]) + 1) <= budget:
                batches[-1].append(key)
                width = max(width, row)
            else:
                batches.append([key])
                width = row
        return batches

    def _base_forward_params(self) -> set[str]:
        net = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return set(inspect.signature(net.forward).parameters)

    def _packing_supported(self) -> bool:
        """Whether the model takes packed rows: a causal LM whose attention takes a custom 4D
        mask and whose forward takes position_ids, without a sliding window."""
        cfg = getattr(self.model, "config", None)
        peft_cfg = getattr(self.model, "active_peft_config", None)
        return (self.backend == "causal" and cfg is not None
                and getattr(cfg, "_attn_implementation", None) in _MASKABLE
                and getattr(cfg, "is_causal", True)
                and not getattr(cfg, "sliding_window", None)
                and not getattr(peft_cfg, "is_prompt_learning", False)
                and "position_ids" in self._base_forward_params())

    @torch.no_grad()
    def _score_packed(self, questions: list[Question]) -> list[list[tuple[float, bool]]]:
        """(sum of log p, greedy) for every continuation of every question, in one forward."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, pos, allowed, keep = pack_rows(questions, int(pad))
        dev = self.device
        if self.model.config._attn_implementation == "sdpa":
            mask = allowed[:, None].to(dev)
        else:  # eager adds the mask to the scores
            dtype = self.mixed_precision_dtype or self.model.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(
                ~allowed, torch.finfo(dtype).min)[:, None].to(dev)
        keep = keep.to(dev)
        kwargs = {"logits_to_keep": keep} if "logits_to_keep" in self._base_forward_params() \
            else {}
        with torch.autocast(device_type=dev.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            logits = self.model(input_ids=ids.to(dev), attention_mask=mask,
                                position_ids=pos.to(dev), use_cache=False, **kwargs).logits
        if not kwargs:
            logits = logits[keep]
        if logits.shape[:-1] != (int(keep.sum()),):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {int(keep.sum())} "
                             f"kept positions")
        logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        greedy = logp.argmax(dim=-1)
        results = []
        for per in scored_rows(questions, keep.cpu()):
            res = []
            for rows, cont in per:
                rows = rows.to(dev)
                target = torch.tensor(cont, dtype=torch.long, device=dev)
                ll = float(logp[rows, target].sum())
                res.append((ll, bool((greedy[rows] == target).all())))
            results.append(res)
        return results
