"""Training and held-out data: load raw records, split them, tokenize them.

Two regimes (``cfg.regime``):

* ``cpt`` (continued pretraining): documents are tokenized, joined with an EOS token after
  every document and packed into consecutive blocks of exactly ``seq_len`` tokens (the final
  partial block is dropped). ``labels == input_ids``; the model shifts them internally.
* ``ift`` (instruction finetuning): one example per (prompt, response) pair:
  ``prompt_template.format(prompt=p)`` followed by the response and EOS. The prompt tokens
  carry label -100 (no loss); the response tokens and the EOS carry labels.

Four sources (``cfg.source``): ``stdlib`` (the Python standard library's own .py files),
``local`` (a .txt/.jsonl/.json file or a folder of text files), ``synthetic`` (generated
arithmetic word problems) and ``hub`` (``datasets.load_dataset``).

Data selection and the train/held-out split use a fixed data seed (:data:`DATA_SEED`), not
the run seed: every method and every run seed sees exactly the same training and held-out
data, so differences between runs come from the method and the run seed only (init, order).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import sysconfig
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf.errors import MissingMandatoryValue

from learnforget.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REGIMES = ("cpt", "ift")
SOURCES = ("stdlib", "local", "synthetic", "hub")
IGNORE_INDEX = -100
DATA_SEED = 0
"""Seed for the stdlib file selection, the synthetic generator and the held-out split."""

STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
)
LOCAL_FILE_SUFFIXES = (".txt", ".jsonl", ".json")
LOCAL_FOLDER_SUFFIXES = (".txt", ".py", ".md")
SYNTHETIC_DEFAULT_PAIRS = 2000
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
OFFLINE_SETS = "data=stdlib_code, data=arith_ift, data=local_text data.path=..."

# Values of the keys in conf/data/_base.yaml, used when a plain dict lacks a key.
_DEFAULTS: dict[str, Any] = {
    "name": "<unnamed>",
    "regime": "cpt",
    "source": None,
    "path": None,
    "hub_id": None,
    "hub_config": None,
    "hub_split": "train",
    "streaming": False,
    "text_field": "text",
    "prompt_field": "prompt",
    "response_field": "response",
    "prompt_template": "{prompt}\n",
    "max_docs": None,
    "heldout_docs": 32,
}

Record = str | tuple[str, str]


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


# --------------------------------------------------------------------------- config access


def _name(cfg: Any) -> str:
    try:
        return str(_get(cfg, "name"))
    except ConfigError:
        return "<unnamed>"


def _get(cfg: Any, key: str) -> Any:
    """``cfg[key]``, the _base.yaml default when absent, ConfigError when ``???``."""
    try:
        return cfg[key]
    except MissingMandatoryValue:
        name = "<unnamed>" if key == "name" else _name(cfg)
        raise ConfigError(f"data.{key} is required for data={name} (give data.{key}=...)") from None
    except KeyError:
        return _DEFAULTS[key]


def _regime(cfg: Any) -> str:
    regime = _get(cfg, "regime")
    if regime not in REGIMES:
        raise ConfigError(
            f"data.regime={regime!r} is not known (data={_name(cfg)}): use one of {', '.join(REGIMES)}"
        )
    return regime


def _source(cfg: Any) -> str:
    source = _get(cfg, "source")
    if source not in SOURCES:
        raise ConfigError(
            f"data.source={source!r} is not known (data={_name(cfg)}): use one of {', '.join(SOURCES)}"
        )
    return source


def _max_docs(cfg: Any) -> int | None:
    max_docs = _get(cfg, "max_docs")
    if max_docs is None:
        return None
    if isinstance(max_docs, bool) or not isinstance(max_docs, int) or max_docs < 1:
        raise ConfigError(f"data.max_docs={max_docs!r}: expected a positive integer or null")
    return max_docs


def _heldout_docs(cfg: Any) -> int:
    heldout = _get(cfg, "heldout_docs")
    if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 0:
        raise ConfigError(f"data.heldout_docs={heldout!r}: expected an integer >= 0")
    return heldout


def _render_prompt(cfg: Any, prompt: str) -> str:
    template = _get(cfg, "prompt_template")
    try:
        return str(template).format(prompt=prompt)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"data.prompt_template={template!r} cannot be filled ({type(err).__name__}: {err}): "
            "use {prompt} as the only field and write literal braces as {{ }}"
        ) from None


# --------------------------------------------------------------------------- records


def _field_text(record: Mapping[str, Any], key: str, setting: str, where: str) -> str:
    if not isinstance(record, Mapping):
        raise ConfigError(
            f"{where}: expected a JSON object (a record), got {type(record).__name__}"
        )
    if key not in record:
        raise ConfigError(
            f"data.{setting}={key!r}: the record at {where} has no field {key!r} "
            f"(keys present: {sorted(map(str, record))})"
        )
    value = record[key]
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(
        f"data.{setting}={key!r}: the field {key!r} of the record at {where} is "
        f"{type(value).__name__}, expected a string"
    )


def record_to_text(cfg: Any, record: Mapping[str, Any], where: str = "record") -> Record:
    """Map one raw record to a document (cpt: ``record[text_field]``) or a
    ``(prompt, response)`` pair (ift: ``record[prompt_field]``, ``record[response_field]``).

    ``where`` (e.g. ``"pairs.jsonl:12"``) goes into the error for a missing field.
    """
    if _regime(cfg) == "cpt":
        return _field_text(record, _get(cfg, "text_field"), "text_field", where)
    prompt = _field_text(record, _get(cfg, "prompt_field"), "prompt_field", where)
    response = _field_text(record, _get(cfg, "response_field"), "response_field", where)
    return prompt, response


def _take(records: Iterable[Record], regime: str, max_docs: int | None) -> list[Record]:
    """The first ``max_docs`` records, skipping empty cpt documents."""
    if regime == "cpt":
        records = (r for r in records if isinstance(r, str) and r.strip())
    return list(itertools.islice(records, max_docs))


def _stdlib_files(root: Path) -> list[str]:
    """Relative paths of the stdlib's .py files (no tests, idlelib or site-packages), sorted."""
    files: list[str] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        base = Path(folder).relative_to(root)
        files.extend((base / n).as_posix() for n in names if n.endswith(".py"))
    return sorted(files)


def _read_text(path: Path) -> str | None:
    """The file's UTF-8 text, or None if it cannot be decoded."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def _load_stdlib(cfg: Any, regime: str) -> tuple[list[Record], str]:
    if regime != "cpt":
        raise ConfigError(
            f"data.source=stdlib gives plain documents: use it with data.regime=cpt, not {regime!r}"
        )
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files(root)
    if not files:
        raise ConfigError(f"data.source=stdlib: no .py files found under {root}")
    # A fixed shuffle (not the run seed), so every run of every method sees the same files;
    # a smaller max_docs selects a prefix of a larger one's selection.
    random.Random(DATA_SEED).shuffle(files)
    texts = (_read_text(root / f) for f in files)
    docs = _take((t for t in texts if t is not None), regime, _max_docs(cfg))
    desc = f"stdlib: {root} ({len(docs)} of {len(files)} .py files, data seed {DATA_SEED})"
    return docs, desc


def _iter_json_records(path: Path) -> Iterator[tuple[Any, str]]:
    """(record, where) for a .jsonl file (one object a line) or a .json file (a list of
    objects; a .json file that holds JSON lines is read as such)."""
    text = _read_text(path)
    if text is None:
        raise ConfigError(f"data.path: {path} is not UTF-8 text")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # perhaps JSON lines in a .json file: read line by line below
        if data is not None:
            if not isinstance(data, list):
                raise ConfigError(
                    f"data.path: {path} holds a JSON {type(data).__name__}, expected a list of "
                    "records (or one JSON object a line)"
                )
            for i, record in enumerate(data, start=1):
                yield record, f"{path} record #{i}"
            return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"data.path: {path}:{lineno} is not valid JSON ({err})") from None
        yield record, f"{path}:{lineno}"


def _folder_files(folder: Path) -> list[Path]:
    """Every .txt/.py/.md file under the folder (hidden and __pycache__ folders skipped),
    sorted by relative path."""
    found: list[str] = []
    for sub, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        base = Path(sub).relative_to(folder)
        found.extend(
            (base / n).as_posix()
            for n in names
            if n.endswith(LOCAL_FOLDER_SUFFIXES) and not n.startswith(".")
        )
    return [folder / f for f in sorted(found)]


def _local_path(cfg: Any) -> Path:
    raw = _get(cfg, "path")
    if raw is None or str(raw).strip() == "":
        raise ConfigError(f"data.path is required for data={_name(cfg)} (give data.path=...)")
    path = Path(str(raw)).expanduser()  # relative paths: relative to the working directory
    if not path.exists():
        raise ConfigError(
            f"data.path: no such file or folder: '{path}' (expected a .txt, .jsonl or .json "
            "file, or a folder of text files)"
        )
    return path


def _load_local(cfg: Any, regime: str) -> tuple[list[Record], str]:
    path = _local_path(cfg)
    max_docs = _max_docs(cfg)
    if path.is_dir():
        if regime != "cpt":
            raise ConfigError(
                f"data.path: {path} is a folder, which gives plain documents (data.regime=cpt); "
                "for ift give a .jsonl or .json file of prompt/response records"
            )
        files = _folder_files(path)
        if not files:
            raise ConfigError(
                f"data.path: the folder {path} holds no {'/'.join(LOCAL_FOLDER_SUFFIXES)} files"
            )
        texts = (_read_text(f) for f in files)
        docs = _take((t for t in texts if t is not None), regime, max_docs)
        return docs, f"local folder: {path} ({len(docs)} of {len(files)} files)"
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if regime != "cpt":
            raise ConfigError(
                f"data.path: {path} is a .txt file, which holds one document (data.regime=cpt); "
                "for ift give a .jsonl or .json file of prompt/response records"
            )
        text = _read_text(path)
        if text is None or not text.strip():
            raise ConfigError(f"data.path: {path} is empty or not UTF-8 text")
        return [text], f"local file: {path} (one document)"
    if suffix in (".jsonl", ".json"):
        records = (record_to_text(cfg, rec, where) for rec, where in _iter_json_records(path))
        docs = _take(records, regime, max_docs)
        if not docs:
            raise ConfigError(f"data.path: {path} holds no (non-empty) records")
        return docs, f"local file: {path} ({len(docs)} records)"
    raise ConfigError(
        f"data.path: '{path}' has an unknown kind of file (expected a .txt, .jsonl or .json "
        "file, or a folder of text files)"
    )


_NAMES = (
    ("Tom", "he"),
    ("Anna", "she"),
    ("Ravi", "he"),
    ("Mei", "she"),
    ("Omar", "he"),
    ("Lena", "she"),
    ("Jonas", "he"),
    ("Sofia", "she"),
)
_NOUNS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "shells")
_TEMPLATES = (  # (operation, prompt)
    ("+", "{name} has {a} {noun} and buys {b} more. How many {noun} does {pron} have now?"),
    ("+", "There are {a} {noun} in one box and {b} {noun} in another. "
          "How many {noun} are there in both boxes?"),
    ("-", "{name} has {a} {noun} and gives {b} of them to a friend. "
          "How many {noun} does {pron} have left?"),
    ("-", "A shop had {a} {noun} and sold {b} of them. How many {noun} does the shop have left?"),
    ("*", "{name} buys {a} bags with {b} {noun} in each bag. "
          "How many {noun} does {pron} buy in total?"),
    ("*", "There are {a} shelves with {b} {noun} on each shelf. "
          "How many {noun} are on the shelves?"),
)  # fmt: skip


def synthetic_arith_pairs(n: int, seed: int = DATA_SEED) -> list[tuple[str, str]]:
    """``n`` distinct arithmetic word problems with a worked answer, e.g.
    ("Tom has 37 apples and buys 45 more. How many apples does he have now?",
    "37 + 45 = 82. The answer is 82."). Deterministic in ``seed``."""
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for _ in range(50 * n + 100):
        if len(pairs) == n:
            break
        op, template = rng.choice(_TEMPLATES)
        name, pron = rng.choice(_NAMES)
        noun = rng.choice(_NOUNS)
        if op == "+":
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            c = a + b
        elif op == "-":
            a = rng.randint(10, 99)
            b = rng.randint(1, a - 1)
            c = a - b
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            c = a * b
        prompt = template.format(name=name, pron=pron, noun=noun, a=a, b=b)
        if prompt in seen:
            continue
        seen.add(prompt)
        pairs.append((prompt, f"{a} {op} {b} = {c}. The answer is {c}."))
    if len(pairs) < n:
        raise ConfigError(
            f"data.max_docs={n}: the arithmetic generator cannot make that many distinct pairs"
        )
    return pairs


def _load_synthetic(cfg: Any, regime: str) -> tuple[list[Record], str]:
    n = _max_docs(cfg) or SYNTHETIC_DEFAULT_PAIRS
    pairs = synthetic_arith_pairs(n)
    desc = f"synthetic: {n} arithmetic word problems (data seed {DATA_SEED})"
    if regime == "ift":
        return list(pairs), desc
    # cpt: each pair rendered as one document (prompt template, then the answer)
    return [_render_prompt(cfg, p) + r for p, r in pairs], desc + ", rendered as documents"


def _is_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in OFFLINE_ENV_VARS
    )


def _hub_unreachable(cfg: Any, hub_id: str, detail: str = "") -> ConfigError:
    msg = (
        f"data={_name(cfg)} needs the Hugging Face hub ({hub_id}), which cannot be reached "
        f"here: use an offline set ({OFFLINE_SETS})"
    )
    return ConfigError(msg + (f" [{detail}]" if detail else ""))


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the hub or the data set could not be reached"."""
    errors: list[type[BaseException]] = [OSError]  # ConnectionError, FileNotFoundError, requests
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover - httpx comes with huggingface_hub
        pass
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _load_hub(cfg: Any, regime: str) -> tuple[list[Record], str]:
    hub_id = _get(cfg, "hub_id")
    if not hub_id:
        raise ConfigError(f"data.hub_id is required for data={_name(cfg)} with data.source=hub")
    if _is_offline():  # checked first, so that the error is instant
        raise _hub_unreachable(cfg, hub_id)
    import datasets

    kwargs: dict[str, Any] = {
        "split": _get(cfg, "hub_split"),
        "streaming": bool(_get(cfg, "streaming")),
    }
    hub_config = _get(cfg, "hub_config")
    if hub_config:
        # starcoderdata keeps each language in a folder, not in a named config
        kwargs["data_dir" if hub_id == "bigcode/starcoderdata" else "name"] = hub_config
    max_docs = _max_docs(cfg)
    try:
        ds = datasets.load_dataset(hub_id, **kwargs)
        rows = (
            record_to_text(cfg, rec, f"{hub_id} record #{i}") for i, rec in enumerate(ds, start=1)
        )
        docs = _take(rows, regime, max_docs)
    except _hub_errors() as err:
        raise _hub_unreachable(cfg, hub_id, f"{type(err).__name__}: {err}") from None
    if not docs:
        raise ConfigError(f"data={_name(cfg)}: {hub_id} gave no (non-empty) records")
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return docs, f"hub: {hub_id} ({args}; first {len(docs)} records)"


_LOADERS = {
    "stdlib": _load_stdlib,
    "local": _load_local,
    "synthetic": _load_synthetic,
    "hub": _load_hub,
}


def _load(cfg: Any) -> tuple[list[Record], str]:
    regime = _regime(cfg)
    return _LOADERS[_source(cfg)](cfg, regime)


def load_records(cfg: Any) -> list[str] | list[tuple[str, str]]:
    """Raw documents (cpt) or (prompt, response) pairs (ift), in a deterministic order,
    at most ``max_docs`` of them (empty cpt documents are skipped)."""
    return _load(cfg)[0]


def records_sha256(records: Sequence[Record]) -> str:
    """sha256 over the records, in order (each one as a JSON line)."""
    h = hashlib.sha256()
    for rec in records:
        h.update(
            json.dumps(rec if isinstance(rec, str) else list(rec), ensure_ascii=False).encode()
        )
        h.update(b"\n")
    return h.hexdigest()


def split_records(
    records: Sequence[Record], heldout_docs: int, seed: int = DATA_SEED
) -> tuple[list[Record], list[Record]]:
    """(train, heldout): ``heldout_docs`` records chosen by a seeded shuffle of the indices;
    both splits keep the records' original order. Depends only on the list and the seed."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:heldout_docs])
    train = [r for i, r in enumerate(records) if i not in held]
    heldout = [records[i] for i in sorted(held)]
    return train, heldout


# --------------------------------------------------------------------------- tokenization


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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, ids=flat, offsets=offsets)
        os.replace(tmp, path)
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
    prompt_ids = _tokenize(tokenizer, [_render_prompt(cfg, p) for p, _ in pairs], cache_dir)
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
    regime = _regime(cfg)
    name = _name(cfg)
    records, source = _load(cfg)
    heldout_docs = _heldout_docs(cfg)
    if heldout_docs >= len(records):
        raise ConfigError(
            f"data.heldout_docs={heldout_docs} leaves nothing to train on: data={name} has "
            f"only {len(records)} records (lower data.heldout_docs or raise data.max_docs)"
        )
    train_recs, heldout_recs = split_records(records, heldout_docs)
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
