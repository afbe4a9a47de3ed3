"""Error bars and paired tests for scores (numpy for the bootstrap; no torch).

- A mean of 0-1 scores is a binomial proportion: standard error sqrt(p(1-p)/n) and
  the Wilson score interval (it stays inside [0, 1] and is not empty at p = 0 or 1).
- A macro average (a mean of group means, e.g. C-Eval over subjects) combines the
  groups' standard errors, sqrt(sum se_g^2) / G, with a normal interval.
- Any other mean (fractional scores such as ROUGE or F1) is bootstrapped over its
  items with a fixed seed, so the same scores always give the same interval.
- Two jobs on the same items: McNemar's exact test on the discordant pairs for 0-1
  scores, and an interval of the difference of means (paired: by items).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054
"""The standard normal's 97.5% quantile: a two-sided 95% interval."""

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 1234
FEW_ITEMS = 30
"""A score from fewer items than this is marked as such: its interval is wide and the
normal approximations behind it are rough."""


@dataclass(frozen=True)
class Spread:
    """How sure a score is: its standard error and a 95% interval (low, high)."""

    stderr: float
    ci95: tuple[float, float]


def is_binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def binomial(successes: float, n: int) -> Spread | None:
    """A proportion of `successes` in `n` trials; None without trials."""
    if n <= 0:
        return None
    p = successes / n
    stderr = math.sqrt(p * (1 - p) / n)
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Spread(stderr, (max(0.0, centre - half), min(1.0, centre + half)))


def bootstrap(columns: dict[str, Sequence[float]], statistic: Callable[..., np.ndarray],
              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
              ) -> np.ndarray:
    """`statistic` over `resamples` resamples of the items (rows drawn with replacement,
    a fixed seed). The items are the rows of `columns` (equal lengths); `statistic`
    takes each column resampled as an array of shape (resamples in a chunk, n) and
    returns one value per resample. Drawn in chunks so a large job never holds
    resamples x n indices at once."""
    data = {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
    n = len(next(iter(data.values())))
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 2_000_000 // max(n, 1)))
    out = []
    for done in range(0, resamples, chunk):
        picks = rng.integers(0, n, size=(min(chunk, resamples - done), n))
        out.append(np.asarray(statistic(**{k: v[picks] for k, v in data.items()}),
                              dtype=np.float64))
    return np.concatenate(out)


def bootstrap_spread(columns: dict[str, Sequence[float]],
                     statistic: Callable[..., np.ndarray]) -> Spread | None:
    """The bootstrap standard error and percentile interval of any statistic of the
    items (an MCC, a weighted score); None without items."""
    if not columns or not len(next(iter(columns.values()))):
        return None
    values = bootstrap(columns, statistic)
    low, high = np.percentile(values, [2.5, 97.5])
    return Spread(float(values.std(ddof=1)), (float(low), float(high)))


def _resampled_means(values: Sequence[float], resamples: int, seed: int) -> np.ndarray:
    return bootstrap({"v": values}, lambda v: v.mean(axis=1), resamples, seed)


def bootstrap_mean(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> Spread | None:
    """The mean's bootstrap standard error and percentile interval; None when empty."""
    n = len(values)
    if n == 0:
        return None
    means = _resampled_means(values, resamples, seed)
    low, high = np.percentile(means, [2.5, 97.5])
    return Spread(float(means.std(ddof=1)), (float(low), float(high)))


def mean_spread(values: Sequence[float]) -> Spread | None:
    """The spread of a plain mean of scores: binomial for 0-1 scores, else bootstrap."""
    if is_binary(values):
        return binomial(sum(values), len(values))
    return bootstrap_mean(values)


def macro_spread(groups: Sequence[Sequence[float]]) -> Spread | None:
    """The spread of a mean of group means (groups independent), clipped to [0, 1]
    when every score is 0-1."""
    spreads = [mean_spread(g) for g in groups if len(g)]
    if not spreads:
        return None
    means = [sum(g) / len(g) for g in groups if len(g)]
    value = sum(means) / len(means)
    stderr = math.sqrt(sum(s.stderr ** 2 for s in spreads)) / len(spreads)
    low, high = value - Z95 * stderr, value + Z95 * stderr
    if all(is_binary(g) for g in groups):
        low, high = max(0.0, low), min(1.0, high)
    return Spread(stderr, (low, high))


def normal_spread(value: float, stderr: float) -> Spread:
    """A score whose standard error is known (lm-eval's own): a normal interval."""
    return Spread(stderr, (value - Z95 * stderr, value + Z95 * stderr))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: under "no difference" each discordant pair is
    a fair coin, so the smaller count is binomial(a_only + b_only, 1/2)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(a: Sequence[float], b: Sequence[float],
                      resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> tuple[float, tuple[float, float]] | None:
    """mean(a) - mean(b) over the same items and its 95% interval: for 0-1 scores the
    paired Wald interval from the discordant counts, else a paired bootstrap (items
    resampled together). None without items."""
    n = len(a)
    if n == 0 or len(b) != n:
        return None
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    difference = sum(diffs) / n
    if is_binary(a) and is_binary(b):
        a_only = sum(1 for d in diffs if d > 0)
        b_only = sum(1 for d in diffs if d < 0)
        stderr = math.sqrt(max(0.0, (a_only + b_only) - (a_only - b_only) ** 2 / n)) / n
        return difference, (difference - Z95 * stderr, difference + Z95 * stderr)
    low, high = np.percentile(_resampled_means(diffs, resamples, seed), [2.5, 97.5])
    return difference, (float(low), float(high))
