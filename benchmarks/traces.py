"""Deterministic synthetic request traces for cache hit-ratio benchmarks.

Every trace is a 1-D ``numpy.int64`` array of integer keys, one element per request, generated
with fixed seeds so that every run (and every policy measured in it) sees the same requests.

The three standard workloads (capacity 100,000 entries = 10% of 1,000,000 keys):

``zipf0.99``
    2,000,000 requests drawn from a Zipf(0.99) distribution over 1,000,000 keys.
``zipf0.7``
    Same with Zipf(0.7).
``scan-mix``
    4 phases of [300,000 Zipf(0.99) requests + a sequential scan of 200,000 keys that no
    scan ever repeats] = 2,000,000 requests. See :func:`scan_mix_trace` for where the scan
    keys come from.

Zipf sampling is exact inverse-CDF sampling over the precomputed (normalised, cumulative)
weights ``rank ** -alpha`` for ranks 1..n_keys; the rank -> key mapping is a fixed random
permutation so that popularity is not correlated with the key id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "CAPACITY",
    "N_KEYS",
    "N_REQUESTS",
    "TRACES",
    "optimal_hit_ratio",
    "scan_mix_trace",
    "zipf_trace",
]

Trace = npt.NDArray[np.int64]

N_KEYS = 1_000_000
"""Size of the Zipf key universe of the standard workloads."""
N_REQUESTS = 2_000_000
"""Length of each standard trace."""
CAPACITY = N_KEYS // 10
"""Cache capacity (entries) used with the standard workloads: 10% of the keys."""

PERMUTATION_SEED = 0x5EED_0001
"""Seed of the rank -> key permutation (shared by all traces over the same key universe)."""
ZIPF_SEED = 0x5EED_0099
"""Default seed of the request sampler."""

_cdf_cache: dict[tuple[float, int], npt.NDArray[np.float64]] = {}
_perm_cache: dict[tuple[int, int], Trace] = {}


def _zipf_cdf(alpha: float, n_keys: int) -> npt.NDArray[np.float64]:
    """Return the cumulative Zipf(alpha) distribution over ranks 1..n_keys (last value 1.0)."""
    key = (float(alpha), int(n_keys))
    cdf = _cdf_cache.get(key)
    if cdf is None:
        ranks = np.arange(1, n_keys + 1, dtype=np.float64)
        weights = ranks ** (-float(alpha))
        cdf = np.cumsum(weights)
        cdf /= cdf[-1]
        cdf[-1] = 1.0
        _cdf_cache[key] = cdf
    return cdf


def _rank_to_key(n_keys: int, seed: int) -> Trace:
    """Return the fixed permutation mapping popularity rank (0-based) to key id."""
    key = (int(n_keys), int(seed))
    perm = _perm_cache.get(key)
    if perm is None:
        perm = np.random.default_rng(seed).permutation(n_keys).astype(np.int64)
        _perm_cache[key] = perm
    return perm


def zipf_trace(
    alpha: float,
    n_keys: int = N_KEYS,
    n_requests: int = N_REQUESTS,
    seed: int = ZIPF_SEED,
    perm_seed: int = PERMUTATION_SEED,
) -> Trace:
    """Draw ``n_requests`` keys from a Zipf(``alpha``) distribution over ``n_keys`` keys.

    The probability of the key of popularity rank ``r`` (1-based) is proportional to
    ``r ** -alpha``; ``alpha`` may be any non-negative value (``alpha < 1`` is allowed, unlike
    ``numpy.random.Generator.zipf``). Keys are integers ``0..n_keys-1``; rank ``r`` maps to key
    ``perm[r-1]`` for a permutation fixed by ``perm_seed``.

    Args:
        alpha: Zipf exponent (skew).
        n_keys: Size of the key universe.
        n_requests: Number of requests to generate.
        seed: Seed of the uniform draws (same seed -> same trace).
        perm_seed: Seed of the rank -> key permutation.

    Returns:
        An ``int64`` array of ``n_requests`` keys.
    """
    if n_keys <= 0 or n_requests < 0:
        raise ValueError("n_keys must be positive and n_requests non-negative")
    cdf = _zipf_cdf(alpha, n_keys)
    u = np.random.default_rng(seed).random(n_requests)
    ranks = np.searchsorted(cdf, u, side="right")
    np.minimum(ranks, n_keys - 1, out=ranks)  # guards the (measure-zero) u == 1.0 edge
    return _rank_to_key(n_keys, perm_seed)[ranks]


def scan_mix_trace(
    phases: int = 4,
    zipf_requests: int = 300_000,
    scan_length: int = 200_000,
    alpha: float = 0.99,
    n_keys: int = N_KEYS,
    seed: int = ZIPF_SEED + 1,
    perm_seed: int = PERMUTATION_SEED,
    scan_keys: Literal["in-universe", "fresh"] = "in-universe",
) -> Trace:
    """Zipf traffic interrupted by one-pass sequential scans.

    The trace is ``phases`` repetitions of [``zipf_requests`` Zipf(``alpha``) requests over
    ``n_keys`` keys, then a scan of ``scan_length`` consecutive keys]. No scan key is ever
    scanned twice: phase ``p`` scans ``base + p*scan_length .. base + (p+1)*scan_length - 1``.

    Where the scanned keys live (``scan_keys``):

    ``"in-universe"`` (default)
        ``base = 0``: the scans sweep key ids ``0 .. phases*scan_length-1`` of the Zipf key
        universe, like a batch job reading the table in key order. A scanned key can therefore
        also be a (randomly placed, see the rank permutation) Zipf key. This is the variant that
        reproduces the published peer numbers (infinite-cache bound 57.44%; LRU 43.12%).
    ``"fresh"``
        ``base = n_keys``: every scan key is brand new, outside the Zipf universe and never seen
        before or after. Its infinite-cache bound is ~47.2%, which is *below* the published
        W-TinyLFU figure (47.86%), so the published numbers cannot come from this variant.

    Args:
        phases: Number of [Zipf burst + scan] phases.
        zipf_requests: Zipf requests per phase.
        scan_length: Keys per scan.
        alpha: Zipf exponent of the hot traffic.
        n_keys: Size of the Zipf key universe.
        seed: Seed of the Zipf draws (one stream of ``phases*zipf_requests`` draws, cut in
            ``phases`` consecutive chunks).
        perm_seed: Seed of the rank -> key permutation.
        scan_keys: ``"in-universe"`` or ``"fresh"``, see above.

    Returns:
        An ``int64`` array of ``phases * (zipf_requests + scan_length)`` keys.
    """
    if scan_keys == "in-universe":
        base = 0
        if phases * scan_length > n_keys:
            raise ValueError("scans would repeat keys: phases*scan_length > n_keys")
    elif scan_keys == "fresh":
        base = n_keys
    else:
        raise ValueError(f"unknown scan_keys {scan_keys!r}")
    hot = zipf_trace(alpha, n_keys, phases * zipf_requests, seed=seed, perm_seed=perm_seed)
    out = np.empty(phases * (zipf_requests + scan_length), dtype=np.int64)
    period = zipf_requests + scan_length
    for p in range(phases):
        start = p * period
        out[start : start + zipf_requests] = hot[p * zipf_requests : (p + 1) * zipf_requests]
        first = base + p * scan_length
        out[start + zipf_requests : start + period] = np.arange(
            first, first + scan_length, dtype=np.int64
        )
    return out


def optimal_hit_ratio(trace: npt.ArrayLike) -> float:
    """Infinite-cache hit ratio of a trace: ``1 - distinct_keys / len(trace)``.

    Only compulsory (first-reference) misses remain, so this bounds every policy at any
    capacity.
    """
    arr = np.asarray(trace)
    if arr.size == 0:
        return 0.0
    return 1.0 - np.unique(arr).size / arr.size


def _zipf099() -> Trace:
    """The ``zipf0.99`` standard trace."""
    return zipf_trace(0.99)


def _zipf07() -> Trace:
    """The ``zipf0.7`` standard trace."""
    return zipf_trace(0.7)


def _scan_mix() -> Trace:
    """The ``scan-mix`` standard trace (in-universe scans, see :func:`scan_mix_trace`)."""
    return scan_mix_trace()


TRACES: dict[str, Callable[[], Trace]] = {
    "zipf0.99": _zipf099,
    "zipf0.7": _zipf07,
    "scan-mix": _scan_mix,
}
"""The standard workloads: name -> zero-argument generator of the trace."""


if __name__ == "__main__":
    import time

    for trace_name, make in TRACES.items():
        t0 = time.perf_counter()
        tr = make()
        dt = time.perf_counter() - t0
        print(f"{trace_name:10s} n={tr.size:,} optimal={optimal_hit_ratio(tr):.2%} ({dt:.2f}s)")
    fresh = scan_mix_trace(scan_keys="fresh")
    print(f"{'scan-fresh':10s} n={fresh.size:,} optimal={optimal_hit_ratio(fresh):.2%}")
