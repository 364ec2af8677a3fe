"""Records into training examples: tokenized, packed into blocks (cpt) or masked (ift).

* ``cpt`` (continued pretraining): documents are tokenized, joined with an EOS token after
  every document and packed into consecutive blocks of exactly ``seq_len`` tokens (the final
  partial block is dropped). ``labels == input_ids``; the model shifts them internally.
* ``ift`` (instruction finetuning): one example per (prompt, response) pair:
  ``prompt_template.format(prompt=p)`` followed by the response and EOS. The prompt tokens
  carry label -100 (no loss); the response tokens and the EOS carry labels.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from learnforget.data.settings import (
    DATA_SEED,
    cfg_heldout_docs,
    cfg_name,
    cfg_regime,
    cfg_train_chars,
    render_prompt,
)
from learnforget.data.sources import load_source, records_sha256, split_records
from learnforget.errors import ConfigError
from learnforget.files import atomic_open

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass
class Example:
    """One training sequence. ``labels`` holds -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizedData:
    """The tokenized train and held-out splits of one data config.

    ``info`` keys: name, regime, source (a description of where the records came from),
    records_sha256 (of the raw records, in order), data_seed, seq_len, n_records,
    n_docs_train, n_docs_heldout (records in each split), n_train_examples,
    n_heldout_examples, n_train_tokens, n_heldout_tokens (tokens whose label is not -100),
    n_truncated (IFT examples cut to seq_len but kept), n_truncated_dropped (IFT examples
    whose response was cut away entirely) and, for cpt, n_tokens_dropped (the partial last
    block of each split).
    """

    regime: str
    train: list[Example]
    heldout: list[Example]
    info: dict[str, Any] = field(default_factory=dict)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """sha256 of a fast tokenizer's full definition (vocabulary, merges, normaliser); None
    for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    cached = getattr(tokenizer, "_learnforget_fingerprint", None)
    if cached is None:
        cached = hashlib.sha256(backend.to_str().encode()).hexdigest()
        tokenizer._learnforget_fingerprint = cached
    return cached


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str],
              cache_dir: Path | None = None) -> list[list[int]]:
    """Token ids of each text, without special tokens (one batch call). With `cache_dir`,
    the ids are kept in <cache_dir>/tokenized/, keyed by the tokenizer's fingerprint and the
    texts, so that every run and eval of the same data tokenizes it once."""
    if not texts:
        return []
    fp = tokenizer_fingerprint(tokenizer) if cache_dir is not None else None
    path = None
    if fp is not None:
        h = hashlib.sha256(fp.encode())
        for t in texts:
            h.update(t.encode())
            h.update(b"\0")
        path = Path(cache_dir) / "tokenized" / f"{h.hexdigest()[:40]}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    flat, offsets = z["ids"], z["offsets"]
                if len(offsets) == len(texts) + 1:
                    return [flat[a:b].tolist() for a, b in itertools.pairwise(offsets.tolist())]
            except (OSError, ValueError, KeyError):
                pass  # unreadable (e.g. a foreign partial file): tokenize again
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    if path is not None:
        offsets = np.cumsum([0] + [len(x) for x in ids], dtype=np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64,
                           count=int(offsets[-1]))
        with atomic_open(path, "wb") as f:
            np.savez(f, ids=flat, offsets=offsets)
    return ids


def pack_documents(
    docs: list[str], tokenizer: PreTrainedTokenizerBase, eos_id: int, seq_len: int,
    cache_dir: Path | None = None,
) -> tuple[list[Example], int]:
    """Blocks of exactly seq_len tokens from the documents joined with EOS after each one;
    returns (blocks, total token count before the partial last block is dropped)."""
    flat: list[int] = []
    for ids in _tokenize(tokenizer, docs, cache_dir):
        flat.extend(ids)
        flat.append(eos_id)
    blocks = []
    for start in range(0, len(flat) - seq_len + 1, seq_len):
        block = flat[start : start + seq_len]
        blocks.append(Example(input_ids=block, labels=list(block)))
    return blocks, len(flat)


def _ift_examples(
    cfg: Any,
    pairs: list[tuple[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    eos_id: int,
    seq_len: int,
    cache_dir: Path | None = None,
) -> tuple[list[Example], int, int]:
    """One example per pair, cut to seq_len; returns (examples, n_truncated, n_dropped)."""
    prompt_ids = _tokenize(tokenizer, [render_prompt(cfg, p) for p, _ in pairs], cache_dir)
    response_ids = _tokenize(tokenizer, [r for _, r in pairs], cache_dir)
    examples: list[Example] = []
    n_truncated = n_dropped = 0
    for p_ids, r_ids in zip(prompt_ids, response_ids, strict=True):
        input_ids = p_ids + r_ids + [eos_id]
        labels = [IGNORE_INDEX] * len(p_ids) + r_ids + [eos_id]
        if len(input_ids) > seq_len:
            if len(p_ids) >= seq_len:  # nothing of the response would be left
                n_dropped += 1
                continue
            n_truncated += 1
            input_ids, labels = input_ids[:seq_len], labels[:seq_len]
        examples.append(Example(input_ids=input_ids, labels=labels))
    return examples, n_truncated, n_dropped


def _n_loss_tokens(examples: list[Example]) -> int:
    return sum(sum(1 for x in ex.labels if x != IGNORE_INDEX) for ex in examples)


def first_chars(records: list, n: int, regime: str, name: str) -> list:
    """The training documents cut to their first ``n`` characters (data.train_chars: a data
    size D in characters, as Hernandez et al. 2021, with the held-out split unchanged): whole
    documents in order, the last one cut. A ConfigError when there are fewer characters."""
    if regime != "cpt":
        raise ConfigError(f"data.train_chars={n} cuts documents: use it with data.regime=cpt "
                          f"(data={name} is {regime})")
    out: list[str] = []
    left = n
    for doc in records:
        if left <= 0:
            break
        out.append(doc[:left])
        left -= len(out[-1])
    if left > 0:
        raise ConfigError(f"data.train_chars={n}: data={name} has only {n - left} training "
                          "characters (raise data.max_docs or lower data.train_chars)")
    return out


def build_data(
    cfg: Any, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int = 0,
    cache_dir: Path | None = None,
) -> TokenizedData:
    """Load the records, hold out ``heldout_docs`` of them (seeded shuffle of the record list
    with :data:`DATA_SEED`) and tokenize both splits (see the module docstring); with
    ``cache_dir`` the token ids are cached on disk (see :func:`_tokenize`).

    ``seed`` is the run seed: it is recorded in ``info`` but does not change the data, so
    that all methods and run seeds are compared on the same examples.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len={seq_len!r}: expected an integer >= 2")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ConfigError("the tokenizer has no EOS token, which the data needs")
    regime = cfg_regime(cfg)
    name = cfg_name(cfg)
    records, source = load_source(cfg, cache_dir)
    heldout_docs = cfg_heldout_docs(cfg)
    if heldout_docs >= len(records):
        raise ConfigError(
            f"data.heldout_docs={heldout_docs} leaves nothing to train on: data={name} has "
            f"only {len(records)} records (lower data.heldout_docs or raise data.max_docs)"
        )
    train_recs, heldout_recs = split_records(records, heldout_docs)
    train_chars = cfg_train_chars(cfg)
    if train_chars is not None:
        train_recs = first_chars(train_recs, train_chars, regime, name)
    info: dict[str, Any] = {
        "name": name,
        "regime": regime,
        "source": source,
        "records_sha256": records_sha256(records),
        "data_seed": DATA_SEED,
        "run_seed": seed,
        "seq_len": seq_len,
        "n_records": len(records),
        "n_docs_train": len(train_recs),
        "n_docs_heldout": len(heldout_recs),
        "n_train_chars": sum(len(r) if isinstance(r, str) else len(r[0]) + len(r[1])
                             for r in train_recs),
        "n_truncated": 0,
        "n_truncated_dropped": 0,
    }
    if regime == "cpt":
        train, n_train_raw = pack_documents(train_recs, tokenizer, eos_id, seq_len, cache_dir)
        heldout, n_heldout_raw = pack_documents(heldout_recs, tokenizer, eos_id, seq_len,
                                                cache_dir)
        for split, blocks, n_raw in (
            ("train", train, n_train_raw),
            ("held-out", heldout, n_heldout_raw),
        ):
            if not blocks and (split == "train" or heldout_recs):
                raise ConfigError(
                    f"data={name}: the {split} documents give {n_raw} tokens, fewer than one "
                    f"block of seq_len={seq_len} (use more documents or a smaller seq_len)"
                )
        info["n_tokens_dropped"] = (n_train_raw % seq_len) + (n_heldout_raw % seq_len)
    else:
        train, n_trunc_train, n_drop_train = _ift_examples(
            cfg, train_recs, tokenizer, eos_id, seq_len, cache_dir
        )
        heldout, n_trunc_held, n_drop_held = _ift_examples(
            cfg, heldout_recs, tokenizer, eos_id, seq_len, cache_dir
        )
        info["n_truncated"] = n_trunc_train + n_trunc_held
        info["n_truncated_dropped"] = n_drop_train + n_drop_held
        if not train:
            raise ConfigError(
                f"data={name}: every training prompt is at least seq_len={seq_len} tokens long, "
                "so no response is left (raise seq_len)"
            )
    info.update(
        n_train_examples=len(train),
        n_heldout_examples=len(heldout),
        n_train_tokens=_n_loss_tokens(train),
        n_heldout_tokens=_n_loss_tokens(heldout),
    )
    return TokenizedData(regime=regime, train=train, heldout=heldout, info=info)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids`` (pad_id), ``labels`` (-100 on
    padding) and ``attention_mask`` (1 on tokens, 0 on padding), all int64 [batch, length]."""
    if not examples:
        raise ValueError("collate: no examples")
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        if len(ex.labels) != n:
            raise ValueError(
                f"collate: example {row} has {n} input_ids but {len(ex.labels)} labels"
            )
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
