"""Metrics on synthetic score sets with known answers (hand-computed or analytic)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.evaluation import scores as m


def phi(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def normal_pdf(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


# --- hand-computed small sets -----------------------------------------------------------------------------------
GEN = np.array([0.9, 0.8, 0.7, 0.4])
IMP = np.array([0.1, 0.2, 0.3, 0.6])


def test_far_frr_on_hand_set():
    assert m.far_at(IMP, 0.5) == 0.25  # only 0.6
    assert m.far_at(IMP, 0.3) == 0.5  # 0.3 and 0.6: a score equal to the threshold matches
    assert m.frr_at(GEN, 0.75) == 0.5  # 0.7 and 0.4
    assert m.frr_at(GEN, 0.4) == 0.0


def test_eer_on_hand_set():
    # for t in (0.4, 0.6]: FAR = 1/4 (0.6 passes), FRR = 1/4 (0.4 fails)
    e, t = m.eer(GEN, IMP)
    assert e == pytest.approx(0.25)
    assert 0.4 < t <= 0.6


def test_eer_zero_when_separated():
    e, t = m.eer([0.8, 0.9], [0.1, 0.2])
    assert e == 0.0
    assert 0.2 < t <= 0.8


def test_auc_on_hand_set():
    # 0.9, 0.8, 0.7 beat all 4 impostors, 0.4 beats 3 -> 15 / 16
    assert m.auc(GEN, IMP) == pytest.approx(15 / 16)
    assert m.auc([0.5], [0.5]) == 0.5  # a tie counts half
    assert m.auc([0.5, 0.7], [0.5, 0.6]) == pytest.approx((0.5 + 0 + 1 + 1) / 4)


def test_tar_at_far_on_hand_set_and_support_flag():
    imp = np.arange(100) / 100.0  # 0.00 .. 0.99
    gen = np.array([0.995, 0.985, 0.5, 0.975])
    r = m.tar_at_far(gen, imp, 1e-2)  # one impostor (0.99) may pass: threshold just above 0.98
    assert r.supported and r.n_impostor == 100 and r.n_genuine == 4
    assert r.far_actual == pytest.approx(0.01)
    assert 0.98 < r.threshold <= 0.99
    assert r.tar == pytest.approx(0.5)  # 0.995 and 0.985
    r3 = m.tar_at_far(gen, imp, 1e-3)  # 1 / FAR = 1000 > 100 pairs: unsupported
    assert not r3.supported and r3.tar is None and r3.threshold is None
    assert m.far_supported(1000, 1e-3) and not m.far_supported(999, 1e-3)


def test_threshold_at_far_rejects_ties_conservatively():
    imp = np.array([0.9, 0.9, 0.5, 0.1])
    t = m.threshold_at_far(imp, 0.25)  # one may pass, but the top two tie: neither passes
    assert m.far_at(imp, t) == 0.0
    assert m.far_at(imp, m.threshold_at_far(imp, 0.5)) == 0.5
    assert m.threshold_at_far(imp, 1.0) == float("-inf")


def test_protection_success_rate_on_hand_set():
    orig_impostor = np.arange(1000) / 1000.0  # FMR 0.1 %: threshold just above 0.998
    t = m.threshold_at_far(orig_impostor, m.PROTECTION_FMR)
    assert 0.998 < t <= 0.999
    cancel_vs_orig = np.array([0.1, 0.998, 0.3, 0.9995, 0.9985])
    assert m.protection_success_rate(cancel_vs_orig, t) == pytest.approx(3 / 5)  # 0.1, 0.998, 0.3 do not match
    assert m.protection_success_rate([0.2, 0.3], 0.25) == 0.5


def test_nan_scores_are_dropped_and_empty_is_an_error():
    assert m.as_scores([0.1, np.nan, 0.3]).tolist() == [0.1, 0.3]
    with pytest.raises(ValueError):
        m.as_scores([np.nan])
    with pytest.raises(ValueError):
        m.as_scores([0.1, np.inf])


def test_det_points_are_monotone():
    rng = np.random.default_rng(0)
    det = m.det_points(rng.normal(1, 1, 3000), rng.normal(0, 1, 3000), max_points=100)
    far, frr = np.array(det["far"]), np.array(det["frr"])
    assert len(far) <= 100
    assert np.all(np.diff(far) <= 0) and np.all(np.diff(frr) >= 0)
    assert far[0] == 1.0 and far[-1] == 0.0 and frr[0] == 0.0 and frr[-1] == 1.0


# --- analytic Gaussian answers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mu, s_gen, s_imp", [(2.0, 1.0, 1.0), (1.0, 0.5, 1.0)])
def test_gaussian_pair_gives_analytic_eer_and_auc(mu, s_gen, s_imp):
    rng = np.random.default_rng(1)
    gen, imp = rng.normal(mu, s_gen, 40000), rng.normal(0.0, s_imp, 40000)
    # FRR(t) = Phi((t - mu)/s_gen) and FAR(t) = Phi(-t/s_imp) cross at t = mu s_imp / (s_gen + s_imp)
    analytic_eer = phi(-mu / (s_gen + s_imp))
    analytic_auc = phi(mu / math.sqrt(s_gen**2 + s_imp**2))
    e, t = m.eer(gen, imp)
    assert e == pytest.approx(analytic_eer, abs=0.006)
    assert t == pytest.approx(mu * s_imp / (s_gen + s_imp), abs=0.03)
    assert m.auc(gen, imp) == pytest.approx(analytic_auc, abs=0.005)


def test_gaussian_tar_at_far_matches_analytic():
    rng = np.random.default_rng(2)
    gen, imp = rng.normal(3.0, 1.0, 50000), rng.normal(0.0, 1.0, 50000)
    r = m.tar_at_far(gen, imp, 1e-2)
    # threshold = z_{0.99} = 2.3263; TAR = Phi(3 - 2.3263)
    assert r.threshold == pytest.approx(2.3263, abs=0.05)
    assert r.tar == pytest.approx(phi(3.0 - 2.3263), abs=0.02)


# --- unlinkability ----------------------------------------------------------------------------------------------
def test_identical_distributions_are_unlinkable():
    rng = np.random.default_rng(3)
    same = rng.normal(0.2, 0.1, 3000)
    assert m.unlinkability(same, same.copy()).d_sys == pytest.approx(0.0, abs=1e-12)
    u = m.unlinkability(rng.normal(0.2, 0.1, 5000), rng.normal(0.2, 0.1, 5000))
    assert u.d_sys < 0.05  # two finite samples of one distribution: only sampling noise


def test_disjoint_distributions_are_fully_linkable():
    rng = np.random.default_rng(4)
    u = m.unlinkability(rng.uniform(0.8, 1.0, 2000), rng.uniform(0.0, 0.2, 2000))
    assert u.d_sys > 0.98
    assert u.d_local.max() == pytest.approx(1.0, abs=1e-6)
    assert np.all(u.d_local[u.grid < 0.3] == 0.0)
    assert np.all((u.d_local >= 0) & (u.d_local <= 1))


def test_gaussian_pair_matches_numerical_d_sys():
    # exact densities: mated N(1, 1), non-mated N(0, 1), omega = 1
    s = np.linspace(-8, 9, 200001)
    pm, pnm = normal_pdf(s, 1.0, 1.0), normal_pdf(s, 0.0, 1.0)
    local = np.clip((pm - pnm) / (pm + pnm), 0, None)
    exact = float(np.sum(pm * local) * (s[1] - s[0]))
    rng = np.random.default_rng(5)
    u = m.unlinkability(rng.normal(1.0, 1.0, 20000), rng.normal(0.0, 1.0, 20000))
    assert 0.1 < exact < 0.5
    assert u.d_sys == pytest.approx(exact, abs=0.02)


def test_omega_prior_moves_d_sys():
    rng = np.random.default_rng(6)
    mated, non = rng.normal(1.0, 1.0, 5000), rng.normal(0.0, 1.0, 5000)
    low, mid, high = (m.unlinkability(mated, non, omega=w).d_sys for w in (0.5, 1.0, 2.0))
    assert low < mid < high


def test_kde_integrates_to_one():
    grid = np.linspace(-5, 5, 1001)
    dens = m.kde_on_grid(np.random.default_rng(7).normal(0, 1, 500), grid, 0.3)
    assert float(np.sum(dens) * (grid[1] - grid[0])) == pytest.approx(1.0, abs=1e-3)


# --- bootstrap --------------------------------------------------------------------------------------------------
def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(8)
    gen, imp = rng.normal(2, 1, 400), rng.normal(0, 1, 400)
    stat = lambda g, i: m.eer(g, i)[0]  # noqa: E731
    a = m.bootstrap_ci(stat, [gen, imp], n_boot=200, seed=11)
    b = m.bootstrap_ci(stat, [gen, imp], n_boot=200, seed=11)
    c = m.bootstrap_ci(stat, [gen, imp], n_boot=200, seed=12)
    assert a == b and a != c
    assert a["lo"] < stat(gen, imp) < a["hi"]
    big = m.bootstrap_ci(stat, [rng.normal(2, 1, 6400), rng.normal(0, 1, 6400)], n_boot=200, seed=11)
    assert (big["hi"] - big["lo"]) < (a["hi"] - a["lo"]) / 2  # width ~ 1/sqrt(n)


def test_verification_summary_flags_unsupported_targets():
    rng = np.random.default_rng(9)
    out = m.verification_summary(rng.normal(2, 1, 300), rng.normal(0, 1, 300), n_boot=50)
    by_far = {t["far_target"]: t for t in out["tar_at_far"]}
    assert by_far[1e-2]["supported"] and not by_far[1e-3]["supported"] and not by_far[1e-4]["supported"]
    assert out["n_impostor"] == 300 and "tar_at_far_0.01" in out["ci"] and "tar_at_far_0.001" not in out["ci"]


def test_accepted_counts_finite_scores_at_a_fixed_threshold():
    assert m.accepted(np.array([0.1, 0.5, np.nan, 0.9]), 0.5) == {"rate": 2 / 3, "accepted": 2, "n": 3}
    assert m.accepted(np.array([np.nan]), 0.5) == {"rate": None, "accepted": 0, "n": 0}


def test_thresholds_among_different_peoples_cancelable_faces():
    """Thresholds from the different-people scores, not the genuine or impostor sets; rates read at them."""
    diff = np.linspace(0.0, 0.999, 1000)  # 1000 pairs: FAR 1e-3 admits the top 1, 1e-2 the top 10
    gen = np.array([0.995, 0.9985, 0.9995, 0.5])
    same_key = np.array([0.9991, 0.2])
    rows = m.thresholds_among(diff, gen, {"impostor_same_key": same_key})
    r3, r2 = rows
    assert r3["supported"] and r2["supported"]
    assert np.sum(diff >= r3["threshold"]) == 1 and np.sum(diff >= r2["threshold"]) == 10
    assert r3["tar"] == {"rate": 0.5, "accepted": 2, "n": 4}  # just above the 2nd highest (0.998): 2 pass
    assert r2["tar"]["accepted"] == 3 and r2["impostor_same_key"]["accepted"] == 1
    assert not m.thresholds_among(diff[:500], gen, {})[0]["supported"]  # 500 pairs cannot support FAR 1e-3
