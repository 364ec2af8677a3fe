"""Token shards: a CPT corpus tokenized once, streamed from its source, read by position.

``data.format=shards`` (continued pretraining only). :func:`prepare_shards` reads the source
one document at a time, tokenizes it in small batches and appends ``ids + [EOS]`` to packed
binary shards (nanoGPT-style raw ``uint16``/``uint32`` arrays, ``train-00000.bin``, ...) under
``<cache_dir>/shards/<key>/``, beside a ``manifest.json`` that records the source, the
tokenizer (name, vocabulary size, sha256 of its definition), the token and document count
and the sha256 of every shard, and whether the corpus is complete. The first
``data.heldout_docs`` documents of the stream go to their own shard (``heldout.bin``) and are
never trained on.

* Preparation resumes after a kill: a shard is closed at a document boundary once it holds
  ``data.shard_tokens`` tokens, written to a temporary file and renamed, and then the
  manifest is rewritten (atomically); a rerun keeps the finished shards, skips the documents
  they hold and rewrites the partial one.
* Training reads block ``i`` (``seq_len`` tokens at position ``i * seq_len`` of the
  concatenated training shards) through a short-lived ``np.memmap`` of the shard(s) that
  hold it, so the process's memory does not grow with the corpus.
* Sequence number ``s`` of a run (micro-batch ``index``, rank ``r`` of ``world``: ``s =
  (index * world + r) * batch_size + j``) is block ``perm_e(s mod n)`` of epoch ``e = s div n``,
  where ``perm_e`` is a seeded bijection of ``[0, n)`` (a Feistel network with cycle walking:
  no array of ``n`` indices is ever built). So the first ``n`` sequences of a run are ``n``
  distinct blocks (a budget up to the corpus size is unique tokens), a resume at step ``k``
  reads exactly where the interrupted run would have, and ranks read disjoint positions that
  together are what one process with ``world`` x the batch reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from learnforget.data.packing import Example, TokenizedData, tokenizer_fingerprint
from learnforget.data.settings import (
    DATA_SEED,
    cfg_heldout_docs,
    cfg_max_docs,
    cfg_name,
)
from learnforget.data.sources import (
    iter_documents,
)
from learnforget.errors import ConfigError
from learnforget.files import atomic_open, atomic_write_json, file_lock, read_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FORMATS = ("memory", "shards")
DEFAULT_SHARD_TOKENS = 100_000_000
TOKENIZE_BATCH_CHARS = 1 << 18   # text per tokenizer call: bounds the preparation's memory
# data keys that do not change the token stream a run reads (left out of the corpus key)
_LAYOUT_KEYS = ("format", "shard_tokens", "expected_tokens", "name")


# --------------------------------------------------------------------------- config

def data_format(data_cfg: Any) -> str:
    fmt = str(_get(data_cfg, "format", "memory"))
    if fmt not in FORMATS:
        raise ConfigError(f"data.format={fmt!r} is not known: use one of {', '.join(FORMATS)}")
    if fmt == "shards" and _get(data_cfg, "train_chars", None) is not None:
        raise ConfigError(f"data.train_chars={data_cfg.get('train_chars')!r} cuts in-memory "
                          "documents: use it with data.format=memory, not shards")
    return fmt


def _get(cfg: Any, key: str, default: Any) -> Any:
    try:
        v = cfg.get(key, default) if hasattr(cfg, "get") else default
    except Exception:  # noqa: BLE001 - a missing mandatory value reads as the default here
        return default
    return default if v is None else v


def shard_tokens(data_cfg: Any) -> int:
    n = _get(data_cfg, "shard_tokens", DEFAULT_SHARD_TOKENS)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"data.shard_tokens={n!r}: expected a positive integer (tokens per shard)")
    return n


def tokenizer_id(model_cfg: Any) -> str:
    """Which tokenizer a model config loads, known without loading it (the corpus key)."""
    src = str(_get(model_cfg, "source", "?"))
    ref = _get(model_cfg, "hub_id", None) or _get(model_cfg, "package", None) or \
        _get(model_cfg, "name", "?")
    return f"{src}:{ref}"


def corpus_dir(cache_dir: Path, data_cfg: Any, model_cfg: Any) -> Path:
    """Where the shards of this data config, tokenized by this model's tokenizer, live."""
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) \
        else dict(data_cfg)
    ident = {k: v for k, v in sorted(plain.items()) if k not in _LAYOUT_KEYS}
    blob = json.dumps({"data": ident, "tokenizer": tokenizer_id(model_cfg),
                       "format": FORMAT_VERSION}, sort_keys=True, default=str)
    name = f"{plain.get('name', 'data')}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    return Path(cache_dir).expanduser() / "shards" / name


def read_manifest(folder: Path) -> dict[str, Any] | None:
    return read_json(Path(folder) / MANIFEST)


# --------------------------------------------------------------------------- documents



# --------------------------------------------------------------------------- preparation

class _Discarded(Exception):
    """Thrown into a shard's atomic_open to drop it."""


class _ShardWriter:
    """One shard being written: a temporary file, its token count and running sha256."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype) -> None:
        self.final = folder / name
        self._file = atomic_open(self.final, "wb")  # renamed into place by close()
        self.f = self._file.__enter__()
        self.dtype = dtype
        self.sha = hashlib.sha256()
        self.tokens = self.docs = 0

    def discard(self) -> None:
        """Drop the shard: its temporary file is removed, nothing is renamed."""
        with contextlib.suppress(_Discarded):
            self._file.__exit__(_Discarded, _Discarded(), None)

    def add(self, ids: Sequence[int], eos_id: int) -> None:
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[:-1] = ids
        arr[-1] = eos_id
        b = arr.tobytes()
        try:
            self.f.write(b)
        except OSError as e:  # the temporary file goes; a full disk is one line naming the shard
            self._file.__exit__(type(e), e, e.__traceback__)
            raise
        self.sha.update(b)
        self.tokens += len(arr)
        self.docs += 1

    def close(self) -> dict[str, Any]:
        self._file.__exit__(None, None, None)
        return {"file": self.final.name, "tokens": self.tokens, "docs": self.docs,
                "sha256": self.sha.hexdigest()}


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _batches(docs: Iterator[str], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _valid_shards(folder: Path, entries: list[dict[str, Any]], itemsize: int) -> list[dict]:
    """The manifest's shards up to the first one missing or of the wrong size."""
    kept = []
    for e in entries:
        p = folder / e["file"]
        if not p.is_file() or p.stat().st_size != e["tokens"] * itemsize:
            break
        kept.append(e)
    return kept


def prepare_shards(docs: Iterable[str], tokenizer: Any, out_dir: Path, *, shard_tokens: int,
                   heldout_docs: int, source: str, tokenizer_name: str,
                   batch_chars: int = TOKENIZE_BATCH_CHARS) -> dict[str, Any]:
    """Tokenize ``docs`` into shards under ``out_dir`` (see the module docstring); returns the
    manifest. Resumes a partial preparation of the same corpus; a complete one is returned
    as it is."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ConfigError("the tokenizer has no EOS token, which the data needs")
    vocab = len(tokenizer)
    dtype = _token_dtype(vocab)
    tok_info = {"name": tokenizer_name, "fingerprint": tokenizer_fingerprint(tokenizer),
                "vocab_size": vocab, "eos_id": eos_id}
    manifest = read_manifest(out_dir)
    fresh = {"format_version": FORMAT_VERSION, "source": source, "tokenizer": tok_info,
             "dtype": dtype.name, "shard_tokens": shard_tokens, "heldout_docs": heldout_docs,
             "heldout": None, "shards": [], "complete": False}
    same = manifest is not None and all(
        manifest.get(k) == fresh[k] for k in ("format_version", "tokenizer", "dtype",
                                              "shard_tokens", "heldout_docs"))
    if same and manifest.get("complete"):
        return manifest
    if not same:
        manifest = fresh
    manifest["source"] = source
    manifest["shards"] = _valid_shards(out_dir, manifest["shards"], dtype.itemsize)
    held = manifest.get("heldout")
    if held and not _valid_shards(out_dir, [held], dtype.itemsize):
        manifest["heldout"], manifest["shards"] = None, []
    for stray in out_dir.glob(".*.tmp"):  # a shard that was being written when killed
        stray.unlink()
    done = (manifest["heldout"]["docs"] if manifest["heldout"] else 0) + \
        sum(e["docs"] for e in manifest["shards"])
    atomic_write_json(out_dir / MANIFEST, manifest)

    it = iter(docs)
    for _ in itertools.islice(it, done):  # documents already in finished shards
        pass
    writer: _ShardWriter | None = None
    if manifest["heldout"] is None and heldout_docs > 0:
        writer = _ShardWriter(out_dir, "heldout.bin", dtype)
    for batch in _batches(it, batch_chars):
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for doc_ids in ids:
            if writer is None:
                writer = _ShardWriter(out_dir, f"train-{len(manifest['shards']):05d}.bin", dtype)
            writer.add(doc_ids, eos_id)
            if writer.final.name == "heldout.bin":
                if writer.docs >= heldout_docs:
                    manifest["heldout"] = writer.close()
                    atomic_write_json(out_dir / MANIFEST, manifest)
                    writer = None
            elif writer.tokens >= shard_tokens:
                manifest["shards"].append(writer.close())
                atomic_write_json(out_dir / MANIFEST, manifest)
                writer = None
    if writer is not None and writer.docs:
        entry = writer.close()
        if entry["file"] == "heldout.bin":
            manifest["heldout"] = entry
        else:
            manifest["shards"].append(entry)
    elif writer is not None:
        writer.discard()
    if not manifest["shards"]:
        raise ConfigError(f"data: the source ({source}) gives no training documents after the "
                          f"{heldout_docs} held-out ones (lower data.heldout_docs)")
    n_train = sum(e["tokens"] for e in manifest["shards"])
    manifest.update(
        complete=True, n_train_tokens=n_train,
        n_train_docs=sum(e["docs"] for e in manifest["shards"]),
        n_heldout_tokens=manifest["heldout"]["tokens"] if manifest["heldout"] else 0,
        checksum=hashlib.sha256("".join(e["sha256"] for e in manifest["shards"]).encode())
        .hexdigest())
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------- reading

class ShardCorpus:
    """A complete shard folder, read by token position without loading it."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        m = read_manifest(self.folder)
        if not m or not m.get("complete"):
            raise ConfigError(f"{self.folder}: no complete token shards (prepare them first)")
        self.manifest = m
        self.dtype = np.dtype(m["dtype"])
        self.files = [self.folder / e["file"] for e in m["shards"]]
        self.offsets = np.cumsum([0] + [e["tokens"] for e in m["shards"]], dtype=np.int64)
        self.n_tokens = int(self.offsets[-1])

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated training shards (int64)."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.n_tokens})")
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        while filled < length:
            k = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            local = pos - int(self.offsets[k])
            take = min(length - filled, int(self.offsets[k + 1]) - pos)
            mm = np.memmap(self.files[k], dtype=self.dtype, mode="r",
                           offset=local * self.dtype.itemsize, shape=(take,))
            out[filled:filled + take] = mm
            del mm  # unmapped at once: no page of the corpus stays in this process
            pos, filled = pos + take, filled + take
        return out

    def heldout(self) -> np.ndarray:
        h = self.manifest.get("heldout")
        if not h:
            return np.empty(0, dtype=np.int64)
        return np.fromfile(self.folder / h["file"], dtype=self.dtype).astype(np.int64)


class ShardBlocks(Sequence[Example]):
    """The corpus as blocks of ``seq_len`` tokens (the partial last block is left out)."""

    def __init__(self, corpus: ShardCorpus, seq_len: int) -> None:
        self.corpus, self.seq_len = corpus, seq_len
        self.n = corpus.n_tokens // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(f"block {i} outside [0, {self.n})")
        ids = self.corpus.tokens(i * self.seq_len, self.seq_len).tolist()
        return Example(input_ids=ids, labels=list(ids))


@dataclass
class ShardData(TokenizedData):
    """TokenizedData whose ``train`` is a :class:`ShardBlocks` read by position."""

    streamed: bool = True


# --------------------------------------------------------------------------- order

_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a 64-bit hash of x."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def permute(i: int, n: int, key: int, rounds: int = 4) -> int:
    """A seeded bijection of [0, n) (Feistel network on the next even power of two, cycle
    walking back into range): the block at position i of an epoch whose key is ``key``."""
    if not 0 <= i < n:
        raise IndexError(f"position {i} outside [0, {n})")
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = bits // 2
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for r in range(rounds):
            left, right = right, left ^ (_mix(right ^ _mix(key * 8 + r)) & mask)
        x = (left << half) | right
        if x < n:
            return x


def epoch_key(seed: int, epoch: int) -> int:
    return _mix(_mix(seed & _M64) ^ epoch)


def sequence_blocks(index: int, batch_size: int, rank: int, world: int, n_blocks: int,
                    seed: int) -> list[int]:
    """The blocks of rank ``rank``'s part of micro-batch ``index`` (see the module docstring)."""
    first = (index * world + rank) * batch_size
    out = []
    for s in range(first, first + batch_size):
        epoch, pos = divmod(s, n_blocks)
        out.append(permute(pos, n_blocks, epoch_key(seed, epoch)))
    return out


# --------------------------------------------------------------------------- run data

def corpus_complete(cache_dir: Path, data_cfg: Any, model_cfg: Any) -> bool:
    """The corpus of this data config and tokenizer is prepared (its manifest says complete)."""
    m = read_manifest(corpus_dir(cache_dir, data_cfg, model_cfg))
    return bool(m and m.get("complete"))


def ensure_corpus(data_cfg: Any, model_cfg: Any, tokenizer: Any, cache_dir: Path, *,
                  prepare: bool = True) -> Path:
    """The shard folder of this data config and tokenizer, prepared (or finished) first when
    it is not complete; a complete one made by another tokenizer is an error. With
    prepare=False an incomplete corpus is a one-line ConfigError (a rank of a multi-rank job
    never tokenizes: `learnforget prepare` or rank 0 before the process group does)."""
    folder = corpus_dir(cache_dir, data_cfg, model_cfg)
    m = read_manifest(folder)
    fp = tokenizer_fingerprint(tokenizer)
    if m and m.get("complete"):
        if m["tokenizer"].get("fingerprint") != fp:
            raise ConfigError(f"token shards {folder} were made by another tokenizer than "
                              f"{tokenizer_id(model_cfg)}'s (fingerprint differs): remove them")
        return folder
    if not prepare:
        raise ConfigError(f"token shards of data={cfg_name(data_cfg)} are not prepared ({folder} "
                          "is missing or partial): run `learnforget prepare <the run's overrides>` "
                          "first")
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / ".prepare.lock"):  # jobs of a study share the corpus: one
        # prepares, the others wait for it
        m = read_manifest(folder)
        if not (m and m.get("complete")):
            docs, desc = iter_documents(data_cfg)
            print(f"learnforget: tokenizing data={cfg_name(data_cfg)} into shards at {folder}"
                  + (" (resuming)" if m else ""))
            prepare_shards(docs, tokenizer, folder, shard_tokens=shard_tokens(data_cfg),
                           heldout_docs=cfg_heldout_docs(data_cfg), source=desc,
                           tokenizer_name=tokenizer_id(model_cfg))
    return ensure_corpus(data_cfg, model_cfg, tokenizer, cache_dir)  # checks the tokenizer


def heldout_blocks(corpus: ShardCorpus, seq_len: int) -> list[Example]:
    flat = corpus.heldout()
    return [Example(input_ids=flat[a:a + seq_len].tolist(), labels=flat[a:a + seq_len].tolist())
            for a in range(0, len(flat) - seq_len + 1, seq_len)]


def shard_data(data_cfg: Any, folder: Path, seq_len: int, seed: int = 0) -> ShardData:
    """The run's data from a prepared shard folder: training blocks read by position, the
    held-out blocks in memory (a few documents)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len={seq_len!r}: expected an integer >= 2")
    corpus = ShardCorpus(folder)
    train = ShardBlocks(corpus, seq_len)
    name = cfg_name(data_cfg)
    if len(train) == 0:
        raise ConfigError(f"data={name}: the shards hold {corpus.n_tokens} training tokens, fewer "
                          f"than one block of seq_len={seq_len}")
    heldout = heldout_blocks(corpus, seq_len)
    m = corpus.manifest
    info = {"name": name, "regime": "cpt", "format": "shards", "source": m["source"],
            "shards": str(folder), "n_shards": len(m["shards"]), "checksum": m["checksum"],
            "tokenizer": m["tokenizer"], "data_seed": DATA_SEED, "run_seed": seed,
            "seq_len": seq_len, "max_docs": cfg_max_docs(data_cfg),
            "n_docs_train": m["n_train_docs"],
            "n_docs_heldout": m["heldout"]["docs"] if m["heldout"] else 0,
            "n_train_examples": len(train), "n_heldout_examples": len(heldout),
            "n_train_tokens": len(train) * seq_len, "n_heldout_tokens": len(heldout) * seq_len,
            "corpus_tokens": corpus.n_tokens,
            "n_tokens_dropped": corpus.n_tokens % seq_len + m["n_heldout_tokens"] % seq_len,
            "n_truncated": 0, "n_truncated_dropped": 0}
    return ShardData(regime="cpt", train=train, heldout=heldout, info=info)  # type: ignore[arg-type]


def accounting(n_examples: int, sequences: int, tokens_per_sequence: float) -> dict[str, Any]:
    """Unique and repeated training tokens of a run that reads ``sequences`` sequences from a
    set of ``n_examples`` (each epoch a permutation: the first ``n_examples`` are distinct)."""
    unique = min(sequences, n_examples)
    return {"sequences": sequences, "examples_in_set": n_examples,
            "unique_sequences": unique, "repeated_sequences": sequences - unique,
            "unique_tokens": int(unique * tokens_per_sequence),
            "repeated_tokens": int((sequences - unique) * tokens_per_sequence),
            "epochs": sequences / n_examples if n_examples else None,
            "budget_exceeds_corpus": sequences > n_examples}

