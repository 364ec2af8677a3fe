"""Generated facts for the learning positive control: N random names, each with one of K
attribute values drawn uniformly at random (`data=facts`).

    ("Bako Tirel", "lives in", "Vusem")  ->  prompt "Bako Tirel lives in", response " Vusem"

Names and values are made-up words (syllables from a fixed seed), so nothing about a fact can
be inferred from language: each fact carries exactly log2 K bits given its name, and the set
N·log2 K bits. A model recalls a fact when the true value has the highest log-likelihood among
the K values after the prompt (chance 1/K; learnforget.analysis.capacity scores it). The
generator is deterministic in (n, k, seed); a smaller n is a prefix of a larger one's facts,
and `offset` skips the first facts of that stream (data.facts_offset: a set disjoint from the
facts a base was pretrained on, sweeps/capacity_control_pretrained.yaml).
"""

from __future__ import annotations

import math
import random

from learnforget.errors import ConfigError

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh")
_VOWELS = ("a", "e", "i", "o", "u")
RELATION = "lives in"
FACTS_SEED = 26


def _word(rng: random.Random, syllables: int) -> str:
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (w + rng.choice(("", "n", "l", "m", "r", "s"))).capitalize()


def fact_values(k: int, seed: int = FACTS_SEED) -> list[str]:
    """The K distinct attribute values (made-up place names), in a fixed order."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(f"data.facts_values={k!r}: expected an integer >= 2")
    rng = random.Random(f"values-{seed}")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < k:
        w = _word(rng, 2)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def facts(n: int, k: int, seed: int = FACTS_SEED, offset: int = 0) -> list[tuple[str, str]]:
    """N (name, value) facts: distinct two-word names, values uniform over fact_values(k); the
    stream's facts offset .. offset + n - 1 (names distinct from the first `offset` facts')."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"data.max_docs={n!r}: expected a positive number of facts")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ConfigError(f"data.facts_offset={offset!r}: expected an integer >= 0 (facts of "
                          "the generator's stream to skip)")
    values = fact_values(k, seed)
    rng = random.Random(f"facts-{seed}")
    out: list[tuple[str, str]] = []
    seen: set[str] = set(values)
    while len(out) < n + offset:
        name = f"{_word(rng, 2)} {_word(rng, rng.choice((1, 2)))}"
        value = values[rng.randrange(k)]
        if name in seen:
            continue
        seen.add(name)
        out.append((name, value))
    return out[offset:]


def fact_pairs(n: int, k: int, seed: int = FACTS_SEED, offset: int = 0
               ) -> list[tuple[str, str]]:
    """The facts as IFT (prompt, response) pairs: ("<name> lives in", " <value>")."""
    return [(f"{name} {RELATION}", f" {value}") for name, value in facts(n, k, seed, offset)]


def facts_bits(n: int, k: int) -> float:
    """The information in N facts with K uniformly drawn values: N·log2 K bits."""
    return n * math.log2(k)
