"""Verify operating points from genuine and impostor scores: thresholds at target false-accept rates, with the
FAR's exact (Clopper-Pearson) 95 % confidence interval. Pure Python; no torch.

A trial is accepted iff score >= threshold (as ``cancelable verify`` decides). ``rounded_threshold_at_far`` returns the
lowest 4-decimal threshold whose empirical FAR is <= the target; with n impostor trials the empirical FAR cannot
resolve rates below 1/n, and the confidence interval says how far the true FAR may lie from the measured one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

FAR_TARGETS = (1e-1, 1e-2, 5e-3, 1e-3, 1e-4)
"""The false-accept rates a calibration stores an operating point for (``cancelable verify --far`` picks one)."""


def rounded_threshold_at_far(impostor: Sequence[float], far: float) -> float:
    """Lowest 4-decimal threshold t with #(impostor >= t) <= floor(far * n); -1.0 when every impostor may pass."""
    imp = sorted(impostor, reverse=True)
    allowed = math.floor(far * len(imp) + 1e-9)
    if allowed >= len(imp):
        return -1.0
    bound = imp[allowed]  # t must be strictly above this score
    t = math.floor(bound * 1e4) / 1e4 + 1e-4
    return round(min(t, 1.0001), 4)


def rate_at(scores: Sequence[float], t: float) -> float:
    """Share of ``scores`` >= t (nan when empty)."""
    return sum(s >= t for s in scores) / len(scores) if scores else float("nan")


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact enough for n up to millions, k small or not)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _solve(f: Any, lo: float, hi: float) -> float:
    """Root of a decreasing f on [lo, hi] by bisection (60 halvings: far below any rate we report)."""
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided ``level`` confidence interval of a binomial rate from k successes in n trials."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError("need 0 <= k <= n and n > 0")
    alpha = 1.0 - level
    lower = 0.0 if k == 0 else _solve(lambda p: (1.0 - _binom_cdf(k - 1, n, p)) - alpha / 2 < 0, 0.0, 1.0)
    upper = 1.0 if k == n else _solve(lambda p: _binom_cdf(k, n, p) - alpha / 2 > 0, 0.0, 1.0)
    return lower, upper


def operating_point(genuine: Sequence[float], impostor: Sequence[float], far_target: float) -> dict[str, Any]:
    """The threshold at ``far_target`` and what it gives on these scores: measured FAR with its 95 % interval,
    TAR, counts."""
    if not impostor:
        raise ValueError("no impostor scores")
    t = rounded_threshold_at_far(impostor, far_target)
    k = sum(s >= t for s in impostor)
    lo, hi = clopper_pearson(k, len(impostor))
    return {
        "far_target": far_target,
        "threshold": t,
        "far": k / len(impostor),
        "far_ci95": [round(lo, 6), round(hi, 6)],
        "impostors_accepted": k,
        "n_impostor": len(impostor),
        "tar": rate_at(genuine, t),
        "n_genuine": len(genuine),
        "resolved": far_target * len(impostor) >= 1.0,
    }


def operating_points(
    genuine: Sequence[float], impostor: Sequence[float], targets: Sequence[float] = FAR_TARGETS
) -> list[dict[str, Any]]:
    """One ``operating_point`` per target FAR, in the order given."""
    return [operating_point(genuine, impostor, f) for f in targets]


def observed_eer(genuine: Sequence[float], impostor: Sequence[float]) -> tuple[float, float]:
    """(EER, threshold): the accept threshold among the observed scores where FAR and FRR are closest."""
    best = (2.0, 0.0, 0.0)
    for t in sorted(set(genuine) | set(impostor)) + [1.01]:
        far, frr = rate_at(impostor, t), 1.0 - rate_at(genuine, t)
        if abs(far - frr) < best[0]:
            best = (abs(far - frr), (far + frr) / 2, t)
    return best[1], best[2]
