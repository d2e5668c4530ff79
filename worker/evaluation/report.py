"""Turn merged shard records into the report: ``report.json`` (stable schema), ``report.md`` and PNG figures.

Schema (``schema_version`` 1; every score is the independent evaluator's cosine; ``null`` = not measurable)::

    {"schema_version": 1, "tool": "cancelable-eval", "created_utc": ISO-8601,
     "run": {config, engine, evaluator, shards, n_identities, n_second_photo, skipped_by_engine,
             failures_to_acquire, seconds},
     "thresholds": {"original_fmr_1e-3": {"value", "fmr", "n_impostor", "supported"}},
     "protocols": {
       "original":      verification block,
       "enrol_probe":   {"same_key": verification block, "other_key": verification block,
                         "at_original_threshold": {"tar", "far_same_key", "far_other_key"},
                         "genuine_second_photo": stats|null, "genuine_synthetic_capture": stats|null},
       "protection":    {"threshold", "psr_vs_original_photo": rate block, "psr_vs_input_crop": rate block,
                         "psr_vs_other_photo": rate block, "reconstruction_match_rate": rate block, ...stats},
       "unlinkability": {"d_sys", "d_sys_ci", "omega", "n_mated", "n_non_mated", "curve": {...},
                         "mated_stats", "non_mated_stats"},
       "revocation":    {"threshold", "reissued_matches_revoked": rate block, "new_probe_rejected_by_revoked":
                         rate block, "new_probe_accepted_by_reissued": rate block},
       "attack":        {"threshold", "no_key": {"success_rate": rate block, ...}, "key_known": {...}}}}

A *verification block* is ``metrics.verification_summary`` (n_genuine, n_impostor, eer, auc, tar_at_far list with
support flags, stats, det points, ci). A *rate block* is ``{"value", "n", "ci": {"lo", "hi", ...}}``.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from worker.evaluation import plots
from worker.evaluation import scores as m

SCHEMA_VERSION = 1


def _rate(values: np.ndarray, match: bool, threshold: float, n_boot: int, seed: int) -> dict[str, Any]:
    """Share of scores that match (>= threshold) or do not match, with a bootstrap interval."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"value": None, "n": 0, "ci": None}

    def stat(x: np.ndarray) -> float:
        return float(np.mean(x >= threshold) if match else np.mean(x < threshold))

    return {"value": stat(v), "n": int(v.size), "ci": m.bootstrap_ci(stat, [v], n_boot, seed)}


def _stats(values: np.ndarray) -> dict | None:
    v = np.asarray(values, float)
    return m.score_stats(v) if np.isfinite(v).any() else None


def _verification(gen: np.ndarray, imp: np.ndarray, n_boot: int, seed: int) -> dict | None:
    if not (np.isfinite(gen).any() and np.isfinite(imp).any()):
        return None
    return m.verification_summary(gen, imp, m.FAR_TARGETS, n_boot, seed)


def build_report(scores: dict[str, Any], metas: list[dict], n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """Metrics of every protocol from ``protocols.compute_scores`` output and the shards' meta."""
    cfg = metas[0]["config"]
    orig = scores["original"]
    imp_orig = orig["impostor"][np.isfinite(orig["impostor"])]
    t_orig = m.threshold_at_far(imp_orig, m.PROTECTION_FMR)
    threshold = {
        "value": t_orig,
        "fmr": m.PROTECTION_FMR,
        "n_impostor": int(imp_orig.size),
        "supported": m.far_supported(imp_orig.size, m.PROTECTION_FMR),
    }
    ep = scores["enrol_probe"]
    pr = scores["protection"]
    un = scores["unlinkability"]
    rv = scores["revocation"]
    at = scores["attack"]
    protocols: dict[str, Any] = {}
    protocols["original"] = _verification(orig["genuine"], orig["impostor"], n_boot, seed)
    protocols["enrol_probe"] = {
        "same_key": _verification(ep["genuine"], ep["impostor_same_key"], n_boot, seed),
        "other_key": _verification(ep["genuine"], ep["impostor_other_key"], n_boot, seed),
        "at_original_threshold": {
            "tar": _rate(ep["genuine"], True, t_orig, n_boot, seed),
            "far_same_key": _rate(ep["impostor_same_key"], True, t_orig, n_boot, seed),
            "far_other_key": _rate(ep["impostor_other_key"], True, t_orig, n_boot, seed),
        },
        "genuine_second_photo": _stats(ep["genuine_second_photo"]),
        "genuine_synthetic_capture": _stats(ep["genuine_synthetic_capture"]),
    }
    protocols["protection"] = {
        "threshold": t_orig,
        "psr_vs_original_photo": _rate(pr["vs_original_photo"], False, t_orig, n_boot, seed),
        "psr_vs_input_crop": _rate(pr["vs_input_crop"], False, t_orig, n_boot, seed),
        "psr_vs_other_photo": _rate(pr["vs_other_photo"], False, t_orig, n_boot, seed),
        "reconstruction_match_rate": _rate(pr["recon_vs_original_photo"], True, t_orig, n_boot, seed),
        "reconstruction_match_rate_vs_input_crop": _rate(pr["recon_vs_input_crop"], True, t_orig, n_boot, seed),
        "stats": {k: _stats(v) for k, v in pr.items()},
    }
    if np.isfinite(un["mated"]).any() and np.isfinite(un["non_mated"]).any():
        u = m.unlinkability(un["mated"], un["non_mated"])
        block = u.as_dict()
        block["d_sys_ci"] = m.bootstrap_ci(
            lambda a, b: m.unlinkability(a, b, grid_points=1024).d_sys, [un["mated"], un["non_mated"]], 200, seed
        )
        block["mated_stats"] = _stats(un["mated"])
        block["non_mated_stats"] = _stats(un["non_mated"])
        block["mated_match_rate"] = _rate(un["mated"], True, t_orig, n_boot, seed)
        protocols["unlinkability"] = block
    else:
        protocols["unlinkability"] = None
    protocols["revocation"] = {
        "threshold": t_orig,
        "reissued_matches_revoked": _rate(rv["reissued_vs_revoked"], True, t_orig, n_boot, seed),
        "new_probe_rejected_by_revoked": _rate(rv["new_probe_vs_revoked"], False, t_orig, n_boot, seed),
        "new_probe_accepted_by_reissued": _rate(rv["new_probe_vs_reissued"], True, t_orig, n_boot, seed),
        "stats": {k: _stats(v) for k, v in rv.items()},
    }
    protocols["attack"] = {
        "threshold": t_orig,
        "attack_steps": cfg.get("attack_steps"),
        "no_key": {
            "success_rate": _rate(at["no_key_vs_original_photo"], True, t_orig, n_boot, seed),
            "success_rate_vs_other_photo": _rate(at["no_key_vs_other_photo"], True, t_orig, n_boot, seed),
            "stats": _stats(at["no_key_vs_original_photo"]),
        },
        "key_known": {
            "success_rate": _rate(at["key_known_vs_original_photo"], True, t_orig, n_boot, seed),
            "success_rate_vs_other_photo": _rate(at["key_known_vs_other_photo"], True, t_orig, n_boot, seed),
            "stats": _stats(at["key_known_vs_original_photo"]),
        },
    }
    # the deployment convention: thresholds set among different people's cancelable faces
    protocols["cancelable_thresholds"] = (
        m.thresholds_among(
            scores["different_people"],
            ep["genuine"],
            {"impostor_same_key": ep["impostor_same_key"], "impostor_other_key": ep["impostor_other_key"]},
        )
        if scores.get("different_people") is not None and np.isfinite(scores["different_people"]).sum() > 0
        else None
    )
    protocols["product"] = product_decisions(scores.get("product"), metas[0].get("verify"))
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "cancelable-eval",
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "run": {
            "config": {k: v for k, v in cfg.items() if k not in ("shard_index",)},
            "engine": metas[0].get("engine"),
            "evaluator": metas[0].get("evaluator"),
            "shards": len(metas),
            "example_columns": metas[0].get("example_columns"),
            "n_identities": scores["n_identities"],
            "n_second_photo": scores["n_second_photo"],
            "stopped_by_time_budget": any(x.get("stopped_by_time_budget") for x in metas),
            "skipped_by_engine": _sum_dicts([x.get("skipped_by_engine", {}) for x in metas]),
            "failures_to_acquire": scores["failures_to_acquire"],
            "judge_detection_misses": _sum_dicts([x.get("judge_detection_misses", {}) for x in metas]),
            "fallback_alignment": metas[0].get("fallback_alignment"),
            "seconds": _sum_dicts([x.get("seconds", {}) for x in metas]),
            "bootstrap": {"n_boot": n_boot, "seed": seed, "note": "score arrays resampled independently"},
        },
        "thresholds": {"original_fmr_1e-3": threshold},
        "protocols": protocols,
    }


def product_decisions(product: dict | None, verify: dict | None) -> dict | None:
    """The product's own verify decisions (engine scores) at its shipped threshold per enrolment size."""
    if not product or not verify:
        return None
    out: dict[str, Any] = {"matcher": verify.get("matcher")}
    for size, sets in product.items():
        t = verify["thresholds"].get(size)
        if t is None:
            continue
        out[size] = {
            "threshold": t,
            "far_calibrated": verify.get("far", {}).get(size),
            **{name: m.accepted(v, t) for name, v in sets.items()},
        }
    return out


def _sum_dicts(dicts: list[dict]) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


# --- figures ------------------------------------------------------------------------------------------------------
def figures(report: dict, scores: dict, records: dict) -> dict[str, bytes]:
    """PNG bytes by file name: DET curves, histograms per protocol, D<->(s), example faces."""
    out: dict[str, bytes] = {}
    p = report["protocols"]
    t = report["thresholds"]["original_fmr_1e-3"]["value"]
    det_series = []
    for label, block in (
        ("original vs original", p["original"]),
        ("cancelable, same key (enrol/probe)", p["enrol_probe"]["same_key"]),
        ("cancelable, other-key impostors", p["enrol_probe"]["other_key"]),
    ):
        if block:
            far = np.maximum(np.array(block["det"]["far"]), 1e-5)
            frr = np.maximum(np.array(block["det"]["frr"]), 1e-5)
            det_series.append(plots.Series(label, far, frr))
    if det_series:
        img = plots.line_plot(det_series, "DET curves", "FAR (FMR)", "FRR (FNMR)", (1e-5, 1), (1e-5, 1), True, True)
        out["det.png"] = _png(img)
    mark = [("FMR 0.1 %", t)]
    hists = {
        "hist_original.png": ("original vs original", [("mated", scores["original"]["genuine"]),
                                                       ("non-mated", scores["original"]["impostor"])]),
        "hist_enrol_probe.png": ("cancelable vs cancelable, same key, enrol then probe", [
            ("mated", scores["enrol_probe"]["genuine"]),
            ("same-key impostor", scores["enrol_probe"]["impostor_same_key"]),
            ("other-key impostor", scores["enrol_probe"]["impostor_other_key"])]),
        "hist_protection.png": ("cancelable vs original, same person", [
            ("cancelable vs original photo", scores["protection"]["vs_original_photo"]),
            ("cancelable vs input crop", scores["protection"]["vs_input_crop"]),
            ("reconstruction vs original photo", scores["protection"]["recon_vs_original_photo"]),
            ("original non-mated", scores["original"]["impostor"])]),
        "hist_unlinkability.png": ("cancelable key a vs key b", [
            ("mated (same person)", scores["unlinkability"]["mated"]),
            ("non-mated", scores["unlinkability"]["non_mated"])]),
        "hist_revocation.png": ("revocation (key 1 revoked, key 2 reissued)", [
            ("reissued vs revoked", scores["revocation"]["reissued_vs_revoked"]),
            ("new probe vs revoked", scores["revocation"]["new_probe_vs_revoked"]),
            ("new probe vs reissued", scores["revocation"]["new_probe_vs_reissued"])]),
        "hist_attack.png": ("re-inversion attack vs original photo", [
            ("no key", scores["attack"]["no_key_vs_original_photo"]),
            ("key known", scores["attack"]["key_known_vs_original_photo"]),
            ("original mated", scores["original"]["genuine"])]),
    }  # fmt: skip
    for name, (title, groups) in hists.items():
        out[name] = _png(plots.histogram(groups, title, "cosine (independent evaluator)", marks=mark))
    u = p.get("unlinkability")
    if u:
        c = u["curve"]
        pm, pnm = np.array(c["p_mated"]), np.array(c["p_non_mated"])
        peak = max(pm.max(), pnm.max(), 1e-12)
        img = plots.line_plot(
            [
                plots.Series("D<->(s)", c["score"], c["d_local"]),
                plots.Series("p(s|mated), scaled", c["score"], pm / peak, dashed=True),
                plots.Series("p(s|non-mated), scaled", c["score"], pnm / peak, dashed=True),
            ],
            f"Unlinkability: D_sys = {u['d_sys']:.3f}",
            "cosine (independent evaluator)",
            "D<->(s)",
            (min(c["score"]), max(c["score"])),
            (0.0, 1.05),
        )
        out["unlinkability.png"] = _png(img)
    if "examples" in records and len(records["examples"]):
        cols = report["run"].get("example_columns") or []
        img = plots.image_grid(
            records["examples"], cols, [f"identity {i + 1}" for i in range(len(records["examples"]))]
        )
        out["examples.png"] = _png(img)
    return out


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- markdown -----------------------------------------------------------------------------------------------------
def _pct(block: dict | None) -> str:
    if not block or block.get("value") is None:
        return "n/a"
    ci = block.get("ci") or {}
    if ci.get("lo") is not None:
        return f"{100 * block['value']:.1f} % [{100 * ci['lo']:.1f}, {100 * ci['hi']:.1f}] (n={block['n']})"
    return f"{100 * block['value']:.1f} % (n={block['n']})"


def _ver_rows(name: str, block: dict | None) -> list[str]:
    if not block:
        return [f"| {name} | n/a | | | | | |"]
    tars = []
    for t in block["tar_at_far"]:
        tars.append(f"{100 * t['tar']:.1f} %" if t["supported"] else f"unsupported (<{1 / t['far_target']:.0f} pairs)")
    ci = block["ci"]["eer"]
    return [
        f"| {name} | {block['n_genuine']} / {block['n_impostor']} | {100 * block['eer']:.2f} % "
        f"[{100 * ci['lo']:.2f}, {100 * ci['hi']:.2f}] | {block['auc']:.4f} | " + " | ".join(tars) + " |"
    ]


def _nonzero(counts: dict | None) -> str:
    items = {k: v for k, v in (counts or {}).items() if v}
    return ", ".join(f"{k} {v}" for k, v in sorted(items.items())) or "none"


def markdown(report: dict) -> str:
    p, run = report["protocols"], report["run"]
    thr = report["thresholds"]["original_fmr_1e-3"]
    cfg, eng = run["config"], run.get("engine") or {}
    lines = [
        "# Cancelable-face evaluation report",
        "",
        f"Generated {report['created_utc']} by `cancelable-eval` (schema {report['schema_version']}). "
        f"Data: `{cfg['data_dir']}` split `{cfg['split']}`, {run['n_identities']} identities "
        f"({run['n_second_photo']} with a real second photo, the rest with a synthetic second capture"
        f"{'; cut by the time budget' if run.get('stopped_by_time_budget') else ''}), "
        f"{cfg['keys']} keys, bundle `{eng.get('bundle_id')}`, {eng.get('steps')} steps, split `{eng.get('split')}`, "
        f"key target {'on' if eng.get('key_target') else 'off'}. Judge: independent evaluator (YuNet + MobileFaceNet).",
        "",
        f"Operating threshold (original vs original, FMR 0.1 %): cosine {thr['value']:.4f} from "
        f"{thr['n_impostor']} non-mated pairs ({'supported' if thr['supported'] else 'UNSUPPORTED: < 1000 pairs'}).",
        "",
        "## Verification",
        "",
        "| protocol | genuine / impostor pairs | EER [95 % CI] | AUC | TAR@FAR 1e-2 | TAR@FAR 1e-3 | TAR@FAR 1e-4 |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += _ver_rows("original vs original (ceiling)", p["original"])
    lines += _ver_rows("cancelable same key, enrol then probe (same-key impostors)", p["enrol_probe"]["same_key"])
    lines += _ver_rows("cancelable same key, enrol then probe (other-key impostors)", p["enrol_probe"]["other_key"])
    at = p["enrol_probe"]["at_original_threshold"]
    lines += [
        "",
        f"At the original FMR 0.1 % threshold: enrol-then-probe TAR {_pct(at['tar'])}; same-key impostors accepted "
        f"{_pct(at['far_same_key'])}; other-key impostors accepted {_pct(at['far_other_key'])}.",
        "",
        *_convention_lines(p.get("cancelable_thresholds")),
        *_product_lines(p.get("product")),
        "## Protection, unlinkability, revocation, re-inversion",
        "",
        "| measure | value [95 % CI] |",
        "|---|---|",
        f"| protection success rate, cancelable vs original photo | {_pct(p['protection']['psr_vs_original_photo'])} |",
        f"| protection success rate, cancelable vs engine input crop | {_pct(p['protection']['psr_vs_input_crop'])} |",
        f"| protection success rate, cancelable vs other photo | {_pct(p['protection']['psr_vs_other_photo'])} |",
        f"| reconstruction G(E(x)) matches original photo | {_pct(p['protection']['reconstruction_match_rate'])} |",
    ]
    u = p.get("unlinkability")
    if u:
        ci = u["d_sys_ci"]
        lines.append(
            f"| unlinkability D_sys (0 = unlinkable) | {u['d_sys']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}] "
            f"({u['n_mated']} mated / {u['n_non_mated']} non-mated) |"
        )
        ms = u["mated_stats"]
        lines.append(
            f"| mated key a vs key b: mean cosine, match rate | {ms['mean']:.3f} +- {ms['std']:.3f}, "
            f"{_pct(u['mated_match_rate'])} |"
        )
    else:
        lines.append("| unlinkability D_sys | n/a (no scores) |")
    rv, ak = p["revocation"], p["attack"]
    lines += [
        f"| revocation: reissued template matches revoked one | {_pct(rv['reissued_matches_revoked'])} |",
        f"| revocation: new-key probe rejected by revoked template | {_pct(rv['new_probe_rejected_by_revoked'])} |",
        f"| revocation: new-key probe accepted by reissued template | {_pct(rv['new_probe_accepted_by_reissued'])} |",
        f"| re-inversion attack success, no key | {_pct(ak['no_key']['success_rate'])} |",
        f"| re-inversion attack success, key known ({ak['attack_steps']} steps) | "
        f"{_pct(ak['key_known']['success_rate'])} |",
        "",
        f"Judge detector (YuNet) misses per role: {_nonzero(run.get('judge_detection_misses'))}"
        + (
            "; generated faces it missed were aligned by the generator's known crop convention instead."
            if run.get("fallback_alignment")
            else "."
        )
        + f" Failures to acquire (not scored): {_nonzero(run['failures_to_acquire'])}. "
        f"Identities skipped by the engine's detector: {run['skipped_by_engine'] or 'none'}.",
        "",
        "## Figures",
        "",
    ]
    for name, title in (
        ("det.png", "DET curves"),
        ("unlinkability.png", "D<->(s)"),
        ("hist_original.png", "original"),
        ("hist_enrol_probe.png", "enrol then probe"),
        ("hist_protection.png", "protection"),
        ("hist_unlinkability.png", "unlinkability"),
        ("hist_revocation.png", "revocation"),
        ("hist_attack.png", "re-inversion attack"),
        ("examples.png", "example faces"),
    ):
        lines.append(f"![{title}]({name})")
    lines.append("")
    return "\n".join(lines)


def _acc(block: dict | None) -> str:
    if not block or block.get("rate") is None:
        return "n/a"
    return f"{100 * block['rate']:.1f} % ({block['accepted']}/{block['n']})"


def _convention_lines(rows: list[dict] | None) -> list[str]:
    """Thresholds set among different people's cancelable faces (what a deployment must do)."""
    if not rows:
        return []
    lines = [
        "### Thresholds set among different people's cancelable faces",
        "",
        "| FAR among different people's cancelable faces | threshold | genuine accepted (TAR) | same-key impostors | "
        "other-key impostors |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["supported"]:
            lines.append(f"| {100 * r['far']:g} % | unsupported ({r['n_different_people']} pairs) | | | |")
            continue
        lines.append(
            f"| {100 * r['far']:g} % ({r['n_different_people']} pairs) | {r['threshold']:.4f} | {_acc(r['tar'])} | "
            f"{_acc(r['impostor_same_key'])} | {_acc(r['impostor_other_key'])} |"
        )
    return [*lines, ""]


def _product_lines(prod: dict | None) -> list[str]:
    """The product's own decisions (its recognizer's scores) at its shipped threshold per enrolment size."""
    if not prod:
        return []
    lines = [
        f"### The product's own verify decisions (matcher `{prod.get('matcher')}`, shipped thresholds)",
        "",
        "| enrolment | threshold (calibrated FAR) | genuine accepted | after reissue | same-key impostors | "
        "other-key impostors | old-key probe vs reissued |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in ("1", "2"):
        b = prod.get(size)
        if not b:
            continue
        far = b.get("far_calibrated")
        lines.append(
            f"| {size} photo{'s' if size != '1' else ''} | {b['threshold']:.4f} "
            f"({'n/a' if far is None else f'{100 * far:.2g} %'}) | {_acc(b.get('genuine'))} | "
            f"{_acc(b.get('genuine_reissued'))} | {_acc(b.get('impostor_same_key'))} | "
            f"{_acc(b.get('impostor_other_key'))} | {_acc(b.get('old_key_probe_vs_reissued'))} |"
        )
    return [*lines, ""]


# --- writing ------------------------------------------------------------------------------------------------------
def write_report(report: dict, figs: dict[str, bytes], destination: str) -> str:
    """Write report.json, report.md and the PNGs to a local directory or an ``s3://bucket/prefix``."""
    files = {"report.json": json.dumps(report, indent=2).encode(), "report.md": markdown(report).encode()}
    files.update(figs)
    if destination.startswith("s3://"):
        import boto3  # lazily: only for S3 destinations

        bucket, _, prefix = destination[5:].partition("/")
        client = boto3.client("s3")
        for name, data in files.items():
            ctype = {"json": "application/json", "md": "text/markdown", "png": "image/png"}[name.rsplit(".", 1)[1]]
            client.put_object(
                Bucket=bucket, Key=f"{prefix.rstrip('/')}/{name}".lstrip("/"), Body=data, ContentType=ctype
            )
        return destination
    out = Path(destination)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return str(out)
