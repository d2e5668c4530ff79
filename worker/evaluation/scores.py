"""Verification, protection and unlinkability metrics (numpy only), written from their definitions.

Vocabulary (ISO/IEC 30136, ISO/IEC 19795-1): a *comparison score* is a similarity (higher = more alike; here the
evaluator's cosine). A pair is declared a match iff ``score >= threshold``. *Mated* pairs come from the same person
(genuine), *non-mated* pairs from different persons (impostor).

- FAR(t) (= FMR for verification of single attempts) = share of non-mated scores >= t;
  FRR(t) = share of mated scores < t; TAR(t) = 1 - FRR(t).
- EER: the error rate where FAR and FRR cross (linear interpolation between neighbouring thresholds).
- AUC: area under the ROC = P(mated score > non-mated score) + 1/2 P(equal) (Mann-Whitney).
- Protection success rate: share of (cancelable, original) same-person pairs that do NOT match at the threshold
  where the original-vs-original FMR is 0.1 %.
- Unlinkability (Gomez-Barrero et al., "General Framework to Evaluate Unlinkability in Biometric Template
  Protection Systems", IEEE TIFS 2018): with mated score density p(s|Hm) (same person, templates under different
  keys) and non-mated density p(s|Hnm), the local measure is
  ``D<->(s) = p(Hm|s) - p(Hnm|s)`` where positive, else 0. With likelihood ratio LR(s) = p(s|Hm)/p(s|Hnm) and
  prior ratio omega = p(Hm)/p(Hnm) this is ``D<->(s) = 2 omega LR / (1 + omega LR) - 1`` when ``omega LR > 1``, else
  0; the global measure is ``D_sys = integral of p(s|Hm) D<->(s) ds`` in [0, 1] (0: fully unlinkable, 1: fully
  linkable). The paper's default omega = 1. Densities are Gaussian kernel density estimates on a grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FAR_TARGETS = (1e-2, 1e-3, 1e-4)
PROTECTION_FMR = 1e-3


def as_scores(x: Sequence[float] | np.ndarray, name: str = "scores") -> np.ndarray:
    """1-D float64 copy without NaNs (NaN marks a failure to acquire and is dropped); raises on inf or empty."""
    a = np.asarray(x, dtype=np.float64).ravel()
    a = a[~np.isnan(a)]
    if a.size == 0:
        raise ValueError(f"{name}: no scores")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: scores must be finite")
    return a


# --- error rates and thresholds ---------------------------------------------------------------------------------
def far_at(impostor: np.ndarray, threshold: float) -> float:
    """Share of non-mated scores >= threshold."""
    imp = as_scores(impostor, "impostor")
    return float(np.mean(imp >= threshold))


def frr_at(genuine: np.ndarray, threshold: float) -> float:
    """Share of mated scores < threshold."""
    gen = as_scores(genuine, "genuine")
    return float(np.mean(gen < threshold))


def far_supported(n_impostor: int, far: float) -> bool:
    """A FAR target is measurable only if at least one impostor pair may pass: n_impostor * far >= 1."""
    return n_impostor * far >= 1.0 - 1e-9


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """Smallest threshold t with FAR(t) <= far (match iff score >= t).

    With non-mated scores sorted descending s_0 >= s_1 >= ..., at most k = floor(far * n) of them may pass, so t is
    the next float above s_k (ties with s_k are rejected, which can only lower the FAR). ``far >= 1`` -> -inf.
    """
    imp = np.sort(as_scores(impostor, "impostor"))[::-1]
    if not 0.0 <= far:
        raise ValueError("far must be >= 0")
    k = int(np.floor(far * imp.size + 1e-9))
    if k >= imp.size:
        return float("-inf")
    return float(np.nextafter(imp[k], np.inf))


@dataclass(frozen=True)
class TarAtFar:
    far_target: float
    threshold: float | None
    tar: float | None  # None when the target is unsupported by the number of impostor pairs
    far_actual: float | None
    n_genuine: int
    n_impostor: int
    supported: bool

    def as_dict(self) -> dict:
        return asdict(self)


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> TarAtFar:
    """TAR at the threshold where FAR <= ``far``; unsupported (tar None) when n_impostor * far < 1."""
    gen, imp = as_scores(genuine, "genuine"), as_scores(impostor, "impostor")
    if not far_supported(imp.size, far):
        return TarAtFar(far, None, None, None, gen.size, imp.size, False)
    t = threshold_at_far(imp, far)
    return TarAtFar(far, t, float(np.mean(gen >= t)), float(np.mean(imp >= t)), gen.size, imp.size, True)


def error_curves(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds ascending, FAR(t), FRR(t)) at every distinct score, plus one threshold above the maximum."""
    gen, imp = np.sort(as_scores(genuine, "genuine")), np.sort(as_scores(impostor, "impostor"))
    thr = np.unique(np.concatenate([gen, imp]))
    thr = np.append(thr, np.nextafter(thr[-1], np.inf))
    far = 1.0 - np.searchsorted(imp, thr, side="left") / imp.size  # share >= t
    frr = np.searchsorted(gen, thr, side="left") / gen.size  # share < t
    return thr, far, frr


def eer(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """(EER, threshold): FAR and FRR linearly interpolated between the neighbouring thresholds where they cross."""
    thr, far, frr = error_curves(genuine, impostor)
    d = frr - far  # increasing in t: starts <= 0 (FRR 0), ends >= 0 (FAR 0)
    j = int(np.argmax(d >= 0))
    if j == 0:
        return float((far[0] + frr[0]) / 2), float(thr[0])
    a = -d[j - 1] / (d[j] - d[j - 1])
    e_far = far[j - 1] + a * (far[j] - far[j - 1])
    e_frr = frr[j - 1] + a * (frr[j] - frr[j - 1])
    return float((e_far + e_frr) / 2), float(thr[j - 1] + a * (thr[j] - thr[j - 1]))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Area under the ROC: P(genuine > impostor) + 0.5 P(tie), via the Mann-Whitney rank sum."""
    gen, imp = as_scores(genuine, "genuine"), as_scores(impostor, "impostor")
    ranks = _average_ranks(np.concatenate([gen, imp]))
    u = ranks[: gen.size].sum() - gen.size * (gen.size + 1) / 2.0
    return float(u / (gen.size * imp.size))


def det_points(genuine: np.ndarray, impostor: np.ndarray, max_points: int = 400) -> dict[str, list[float]]:
    """DET curve (FAR, FRR) over the thresholds, thinned to about ``max_points`` points (end points kept)."""
    thr, far, frr = error_curves(genuine, impostor)
    if thr.size > max_points:
        idx = np.unique(np.linspace(0, thr.size - 1, max_points).round().astype(int))
        thr, far, frr = thr[idx], far[idx], frr[idx]
    return {"threshold": thr.tolist(), "far": far.tolist(), "frr": frr.tolist()}


def protection_success_rate(cancel_vs_original: np.ndarray, threshold: float) -> float:
    """Share of (cancelable, original) same-person scores that do NOT match (score < threshold)."""
    s = as_scores(cancel_vs_original, "cancelable-vs-original")
    return float(np.mean(s < threshold))


def score_stats(scores: np.ndarray) -> dict[str, float | int]:
    s = as_scores(scores)
    return {
        "n": int(s.size),
        "mean": float(s.mean()),
        "std": float(s.std(ddof=1)) if s.size > 1 else 0.0,
        "median": float(np.median(s)),
        "min": float(s.min()),
        "max": float(s.max()),
    }


# --- unlinkability ----------------------------------------------------------------------------------------------
def silverman_bandwidth(x: np.ndarray) -> float:
    """Silverman's rule 0.9 min(std, IQR / 1.34) n^(-1/5), with a small floor for degenerate samples."""
    x = as_scores(x)
    std = x.std(ddof=1) if x.size > 1 else 0.0
    q75, q25 = np.percentile(x, [75, 25])
    spread = min(std, (q75 - q25) / 1.34) if q75 > q25 else std
    return float(max(0.9 * spread * x.size ** (-0.2), 1e-3))


def kde_on_grid(x: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian KDE of ``x`` on a uniform ``grid`` (linear binning + convolution), normalised to integrate to 1."""
    x = as_scores(x)
    step = grid[1] - grid[0]
    pos = np.clip((x - grid[0]) / step, 0, grid.size - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, grid.size - 1)
    frac = pos - lo
    counts = np.zeros(grid.size)
    np.add.at(counts, lo, 1.0 - frac)
    np.add.at(counts, hi, frac)
    half = int(np.ceil(5 * bandwidth / step))
    offsets = np.arange(-half, half + 1) * step
    kernel = np.exp(-0.5 * (offsets / bandwidth) ** 2)
    dens = np.convolve(counts, kernel, mode="same") if half < grid.size else _direct(counts, grid, bandwidth)
    area = _integrate(dens, grid)
    return dens / area if area > 0 else dens


def _integrate(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoidal rule (np.trapezoid is numpy >= 2 only)."""
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def _direct(counts: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    diff = (grid[:, None] - grid[None, :]) / bandwidth
    return np.exp(-0.5 * diff**2) @ counts


@dataclass(frozen=True)
class Unlinkability:
    d_sys: float
    omega: float
    grid: np.ndarray  # (G,) scores
    d_local: np.ndarray  # (G,) D<->(s)
    p_mated: np.ndarray  # (G,) density
    p_non_mated: np.ndarray  # (G,) density
    n_mated: int
    n_non_mated: int
    bandwidth_mated: float
    bandwidth_non_mated: float

    def as_dict(self, max_points: int = 200) -> dict:
        idx = np.unique(np.linspace(0, self.grid.size - 1, max_points).round().astype(int))
        return {
            "d_sys": self.d_sys,
            "omega": self.omega,
            "n_mated": self.n_mated,
            "n_non_mated": self.n_non_mated,
            "bandwidth_mated": self.bandwidth_mated,
            "bandwidth_non_mated": self.bandwidth_non_mated,
            "curve": {
                "score": self.grid[idx].tolist(),
                "d_local": self.d_local[idx].tolist(),
                "p_mated": self.p_mated[idx].tolist(),
                "p_non_mated": self.p_non_mated[idx].tolist(),
            },
        }


def unlinkability(
    mated: np.ndarray,
    non_mated: np.ndarray,
    omega: float = 1.0,
    grid_points: int = 2048,
    bandwidth: float | None = None,
) -> Unlinkability:
    """Local D<->(s) and global D_sys from mated / non-mated score samples (module docstring)."""
    m, nm = as_scores(mated, "mated"), as_scores(non_mated, "non-mated")
    if omega <= 0:
        raise ValueError("omega must be > 0")
    bw_m = bandwidth or silverman_bandwidth(m)
    bw_nm = bandwidth or silverman_bandwidth(nm)
    pad = 4 * max(bw_m, bw_nm)
    grid = np.linspace(min(m.min(), nm.min()) - pad, max(m.max(), nm.max()) + pad, grid_points)
    p_m = kde_on_grid(m, grid, bw_m)
    p_nm = kde_on_grid(nm, grid, bw_nm)
    num = omega * p_m - p_nm
    den = omega * p_m + p_nm
    # (omega LR - 1) / (omega LR + 1) = (omega p_m - p_nm) / (omega p_m + p_nm); no LR division where p_nm = 0
    d_local = np.where((num > 0) & (den > 0), num / np.where(den > 0, den, 1.0), 0.0)
    d_sys = float(np.clip(_integrate(p_m * d_local, grid), 0.0, 1.0))
    return Unlinkability(d_sys, omega, grid, d_local, p_m, p_nm, m.size, nm.size, bw_m, bw_nm)


# --- bootstrap --------------------------------------------------------------------------------------------------
def bootstrap_ci(
    statistic: Callable[..., float | None],
    samples: Sequence[np.ndarray],
    n_boot: int = 500,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float | int | None]:
    """Percentile bootstrap interval of ``statistic(*samples)``; each sample array is resampled independently.

    Scores that share an identity are not independent, so this interval is a lower bound on the real uncertainty.
    Resamples where the statistic is None/NaN are dropped (counted in ``n_valid``).
    """
    rng = np.random.default_rng(seed)
    arrays = [as_scores(s) for s in samples]
    values = []
    for _ in range(n_boot):
        resampled = [a[rng.integers(0, a.size, a.size)] for a in arrays]
        v = statistic(*resampled)
        if v is not None and np.isfinite(v):
            values.append(float(v))
    if not values:
        return {"lo": None, "hi": None, "level": level, "n_boot": n_boot, "n_valid": 0, "seed": seed}
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {"lo": float(lo), "hi": float(hi), "level": level, "n_boot": n_boot, "n_valid": len(values), "seed": seed}


def verification_summary(
    genuine: np.ndarray,
    impostor: np.ndarray,
    far_targets: Sequence[float] = FAR_TARGETS,
    n_boot: int = 500,
    seed: int = 0,
) -> dict:
    """EER, AUC, TAR at each FAR target (with support flags), score stats, DET points and bootstrap intervals."""
    gen, imp = as_scores(genuine, "genuine"), as_scores(impostor, "impostor")
    e, e_thr = eer(gen, imp)
    tars = [tar_at_far(gen, imp, f) for f in far_targets]
    out: dict[str, Any] = {
        "n_genuine": int(gen.size),
        "n_impostor": int(imp.size),
        "eer": e,
        "eer_threshold": e_thr,
        "auc": auc(gen, imp),
        "tar_at_far": [t.as_dict() for t in tars],
        "genuine_stats": score_stats(gen),
        "impostor_stats": score_stats(imp),
        "det": det_points(gen, imp),
        "ci": {
            "eer": bootstrap_ci(lambda g, i: eer(g, i)[0], [gen, imp], n_boot, seed),
            "auc": bootstrap_ci(auc, [gen, imp], max(n_boot // 5, 50), seed),
        },
    }
    for t in tars:
        if t.supported:
            out["ci"][f"tar_at_far_{t.far_target:g}"] = bootstrap_ci(
                lambda g, i, f=t.far_target: tar_at_far(g, i, f).tar, [gen, imp], n_boot, seed
            )
    return out


def accepted(scores: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """Share (and count) of finite ``scores`` >= threshold: a decision rate at a fixed threshold."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return {"rate": None, "accepted": 0, "n": 0}
    k = int(np.sum(s >= threshold))
    return {"rate": k / s.size, "accepted": k, "n": int(s.size)}


def thresholds_among(
    different_people: np.ndarray,
    genuine: np.ndarray,
    others: dict[str, np.ndarray],
    fars: Sequence[float] = (1e-3, 1e-2),
) -> list[dict[str, Any]]:
    """The deployment convention: thresholds set where ``far`` of the scores of DIFFERENT people's cancelable faces
    match; per FAR: the threshold, whether the sample supports it, the genuine acceptance (TAR) there and the
    acceptance of each set in ``others`` (e.g. same-key impostors) at that threshold."""
    imp = as_scores(different_people, "different_people")
    out = []
    for far in fars:
        row: dict[str, Any] = {
            "far": far,
            "n_different_people": int(imp.size),
            "supported": far_supported(imp.size, far),
        }
        if row["supported"]:
            t = threshold_at_far(imp, far)
            row["threshold"] = t
            row["tar"] = accepted(genuine, t)
            row.update({name: accepted(v, t) for name, v in others.items()})
        out.append(row)
    return out
