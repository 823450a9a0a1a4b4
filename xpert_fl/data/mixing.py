"""Role splits, similarity mixtures and user partitions (paper §7), all deterministic from a seed.

The corpus is split once into three disjoint roles: ``cloud`` (pLLM production), ``user`` (device
data) and ``test`` (held-out evaluation). Instruction data is split *by prompt*, so a test prompt never
appears in training in any style; prompt-less text is split by sample.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from xpert_fl.data.corpus import NEUTRAL, Sample, StyleCorpus

ROLES = ("cloud", "user", "test")


def _key(style: str, index: int, sample: Sample) -> str:
    return f"p:{sample.prompt}" if sample.prompt else f"i:{style}:{index}"


def split_roles(
    corpus: StyleCorpus, fractions: tuple[float, float, float] = (0.5, 0.3, 0.2), seed: int = 0
) -> dict[str, StyleCorpus]:
    """Split a corpus into disjoint cloud/user/test corpora with the given fractions of keys."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    groups = {**corpus.styles, NEUTRAL: corpus.neutral}
    keys = sorted({_key(style, i, s) for style, samples in groups.items() for i, s in enumerate(samples)})
    random.Random(seed).shuffle(keys)
    cut1 = round(fractions[0] * len(keys))
    cut2 = cut1 + round(fractions[1] * len(keys))
    role_of = {k: ROLES[0] if i < cut1 else ROLES[1] if i < cut2 else ROLES[2] for i, k in enumerate(keys)}
    parts: dict[str, dict[str, list[Sample]]] = {role: {} for role in ROLES}
    for style, samples in groups.items():
        for i, s in enumerate(samples):
            parts[role_of[_key(style, i, s)]].setdefault(style, []).append(s)
    return {
        role: StyleCorpus(
            name=f"{corpus.name}/{role}",
            styles={st: parts[role].get(st, []) for st in corpus.styles},
            neutral=parts[role].get(NEUTRAL, []),
            levels=corpus.levels,
        )
        for role in ROLES
    }


def similarity_mixture(
    corpus: StyleCorpus, style: str, similarity: float, n: int | None = None, seed: int = 0
) -> list[Sample]:
    """A pLLM training set at similarity s: a fraction s of samples in ``style``, the rest neutral.

    For instruction data the neutral samples answer *other* prompts of the same pool (never the same
    prompt twice), so the mixture keeps the prompt distribution of the styled data.
    """
    if not 0.0 <= similarity <= 1.0:
        raise ValueError(f"similarity must be in [0, 1], got {similarity}")
    if style not in corpus.styles:
        raise KeyError(f"style {style!r} not in corpus {corpus.name} ({', '.join(corpus.styles)})")
    rng = random.Random(f"{seed}:{style}:{similarity}")
    styled = list(corpus.styles[style])
    rng.shuffle(styled)
    n = len(styled) if n is None else n
    n_styled = round(similarity * n)
    if n_styled > len(styled):
        raise ValueError(f"style {style!r} has {len(styled)} samples, {n_styled} needed")
    chosen = styled[:n_styled]
    used_prompts = {s.prompt for s in chosen if s.prompt}
    neutral_pool = [s for s in corpus.neutral if not (s.prompt and s.prompt in used_prompts)]
    rng.shuffle(neutral_pool)
    n_neutral = n - n_styled
    if n_neutral > len(neutral_pool):
        raise ValueError(f"corpus {corpus.name} has {len(neutral_pool)} usable neutral samples, {n_neutral} needed")
    mixture = chosen + neutral_pool[:n_neutral]
    rng.shuffle(mixture)
    return mixture


def user_samples(
    corpus: StyleCorpus, styles: str | Mapping[str, float], n: int, user_index: int = 0, seed: int = 0
) -> list[Sample]:
    """Personal data of one user: ``n`` samples of one style, or of a weighted mixture of styles.

    Users with different ``user_index`` get disjoint samples of a style while the pool lasts; a
    request that would need to reuse samples raises instead of silently overlapping.
    """
    weights = {styles: 1.0} if isinstance(styles, str) else dict(styles)
    if n <= 0 or not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(f"need n > 0 and non-negative style weights, got n={n}, styles={weights}")
    total = sum(weights.values())
    counts = _apportion(n, {st: w / total for st, w in weights.items()})
    out: list[Sample] = []
    for style, count in counts.items():
        if style not in corpus.styles:
            raise KeyError(f"style {style!r} not in corpus {corpus.name} ({', '.join(corpus.styles)})")
        pool = list(corpus.styles[style])
        random.Random(f"{seed}:user:{style}").shuffle(pool)
        start = user_index * count
        if start + count > len(pool):
            raise ValueError(
                f"style {style!r} has {len(pool)} user samples: not enough for user {user_index} "
                f"with {count} disjoint samples"
            )
        out.extend(pool[start : start + count])
    random.Random(f"{seed}:user:{user_index}").shuffle(out)
    return out


def _apportion(n: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Integer counts summing to n, proportional to shares (largest remainder)."""
    raw = {k: n * v for k, v in shares.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return {k: c for k, c in counts.items() if c > 0}


def train_test_split(samples: list[Sample], test_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Disjoint train/test lists (at least one test sample when there are two or more samples)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = list(samples)
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(order))) if len(order) > 1 else 0
    return order[n_test:], order[:n_test]
