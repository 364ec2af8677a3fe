"""A faster lm-eval backend for multiple choice: each question's shared context is run once for
all its choices (lm-eval model "lf-hf-shared", a subclass of lm-eval's HFLM).

lm-eval's HFLM scores every (context, continuation) request as its own sequence, so a
4-choice question runs its context 4 times. `SharedContextLM._loglikelihood_tokens` groups the
requests whose context tokens are identical (lm-eval's own tokenisation: `_encode_pair`), runs
the context once with the KV cache on, and then all the group's continuations as one batch on
copies of that cache. The log-likelihood of each continuation and its greedy flag are computed
as HFLM computes them (log-softmax of the model's logits at the continuation's positions); only
the order of floating-point work changes, so the values agree with HFLM's to ~1e-6 in float32
(test_fast_lm.py requires 1e-4). Requests that cannot share (a context of fewer than
2 tokens, one request per context, sequences HFLM would truncate) go to HFLM's own code, as
does everything if the model does not accept a cache (it is then used for nothing at all).
Generation and rolling log-likelihoods are HFLM's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

Request = tuple[tuple[str, str], list[int], list[int]]


@register_model("lf-hf-shared")
class SharedContextLM(HFLM):
    """HFLM that computes a question's shared context once for all its choices."""

    _sharing_failed = False

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        rest: list[int] = []
        for i, (_, ctx, cont) in enumerate(requests):
            if (self._sharing_failed or len(ctx) < 2 or not cont
                    or len(ctx) + len(cont) > self.max_length + 1):
                rest.append(i)
            else:
                groups.setdefault(tuple(ctx), []).append(i)
        for key in [k for k, idx in groups.items() if len(idx) < 2]:
            rest.extend(groups.pop(key))
        for key, idx in tqdm(list(groups.items()), disable=disable_tqdm or None,
                             desc="Running shared-context loglikelihood groups"):
            try:
                results = self._score_group(list(key), [requests[i][2] for i in idx])
            except (TypeError, AttributeError, ValueError, RuntimeError):
                self._sharing_failed = True  # the model takes no cache: HFLM's way for all
                rest.extend(idx)
                continue
            for i, r in zip(idx, results, strict=True):
                out[i] = r
                self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
        if rest:
            rest.sort()
            res = super()._loglikelihood_tokens([requests[i] for i in rest],
                                                disable_tqdm=disable_tqdm, override_bs=override_bs)
            for i, r in zip(rest, res, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]  # every index filled above

    def _cache_kwarg(self) -> str:
        """`cache` where the model's forward takes it (transformers >= 5.2x deprecates
        `past_key_values`), else `past_key_values`."""
        import inspect

        net = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return "cache" if "cache" in inspect.signature(net.forward).parameters else \
            "past_key_values"

    @torch.no_grad()
    def _score_group(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """One context, several continuations: (sum of log p, greedy) per continuation."""
        dev = self.device
        first = self.model(input_ids=torch.tensor([ctx[:-1]], device=dev), use_cache=True)
        past = first.past_key_values
        n, width = len(conts), max(len(c) for c in conts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        inp = torch.full((n, width), int(pad), dtype=torch.long, device=dev)
        for i, c in enumerate(conts):
            seq = [ctx[-1], *c[:-1]]
            inp[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        if n > 1:
            past.batch_repeat_interleave(n)
        mask = torch.ones((n, len(ctx) - 1 + width), dtype=torch.long, device=dev)
        logits = self.model(input_ids=inp, attention_mask=mask, use_cache=False,
                            **{self._cache_kwarg(): past}).logits
        logp = F.log_softmax(logits, dim=-1)
        results = []
        for i, c in enumerate(conts):
            lp = logp[i, : len(c)]
            target = torch.tensor(c, dtype=torch.long, device=dev)
            ll = float(lp.gather(1, target[:, None]).sum())
            greedy = bool((lp.argmax(dim=-1) == target).all())
            results.append((ll, greedy))
        return results
