"""Evaluate the lite bundle with the independent judge (YuNet + ArcFace-template alignment + MobileFaceNet, cosine).

Measured (identities the lite model never trained on):
1. thresholds at FAR 1e-2 and 1e-3 from original lfw-dev non-mated pairs: the 3,000 listed in lfw-dev-pairs.tsv
   plus every cross-identity pair among ``--pool`` further images (one per identity, seeded choice);
2. reconstruction: photo A -> dlib-chip -> encoder -> synthesis vs a different original photo B of the same
   person, TAR at both thresholds; original A vs original B on the same pairs is the ceiling. In lfw-dev every
   VALIDATION identity (``worker.evaluation.splits``) has a single photo, so these mated pairs come from the lite
   HOLDOUT identities (``is_holdout_identity``, also never trained on);
3. ``--samples`` key-derived faces (32-byte seeds -> ``worker.algorithm.keylatent.key_latent``, psi 0.7, repeated
   over layers -> synthesis): share where YuNet finds exactly one face, and share of pairs of different keys that
   match at the FAR 1e-3 threshold;
4. time of one 50-step anonymisation (``worker.algorithm.pipeline.Engine.enroll`` of one face, 2 threads).

Writes ``eval.json`` and the measured section of ``MODEL_CARD.md`` in the bundle directory and ``grid.png``
(rows: originals, reconstructions, cancelable faces under key A, under key B, key-derived synthetic faces,
layer-mixed faces: coarse layers from a key, the rest from the real face).

Run: ``.venv/bin/python research/eval_lite.py`` (about 5-15 min on a busy 2-core CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from worker.evaluation.evaluator import DETECTOR_FILE, Evaluator, default_model_dir, load_rgb  # noqa: E402
from worker.evaluation.scores import far_at, threshold_at_far  # noqa: E402
from worker.evaluation.splits import identity_split  # noqa: E402
from worker.models.bundle import load_bundle  # noqa: E402

FARS = (1e-2, 1e-3)
CARD_BEGIN, CARD_END = "<!-- measured:begin -->", "<!-- measured:end -->"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def to_tensor(chips: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(chips).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class EmbedCache:
    """Embeddings of original lfw-dev photos by relative path, cached in an .npz between runs."""

    def __init__(self, ev: Evaluator, data: Path, path: Path):
        self.ev, self.data, self.path = ev, data, path
        self.store: dict[str, np.ndarray] = {}
        if path.is_file():
            z = np.load(path)
            self.store = dict(zip(z["keys"].tolist(), z["emb"], strict=True))

    def get(self, rels: list[str]) -> np.ndarray:
        """-> (N, 128) with NaN rows where YuNet finds no face."""
        todo = [r for r in dict.fromkeys(rels) if r not in self.store]
        for i, r in enumerate(todo):
            e = self.ev.embed(load_rgb(self.data / r))
            self.store[r] = e if e is not None else np.full(128, np.nan, np.float32)
            if (i + 1) % 500 == 0:
                log(f"  embedded {i + 1}/{len(todo)} originals")
        if todo:
            self.save()
        return np.stack([self.store[r] for r in rels])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.store)
        np.savez(self.path, keys=np.array(keys), emb=np.stack([self.store[k] for k in keys]))


def embed_images(ev: Evaluator, images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, 128), NaN rows for failures to acquire."""
    out = []
    for im in images:
        e = ev.embed(np.ascontiguousarray(im))
        out.append(e if e is not None else np.full(128, np.nan, np.float32))
    return np.stack(out)


def cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine (embeddings are L2-normalised; NaN rows stay NaN)."""
    return np.sum(a * b, axis=1)


class FaceCounter:
    """Counts YuNet faces the way ``Evaluator.detect`` looks for them (upscale to >= min_side, then reflect-pad)."""

    def __init__(self, model_dir: Path, min_side: int = 160, score_threshold: float = 0.6):
        import cv2

        self.cv2, self.min_side = cv2, min_side
        self.det = cv2.FaceDetectorYN.create(str(model_dir / DETECTOR_FILE), "", (320, 320), score_threshold, 0.3, 5000)

    def _raw(self, bgr: np.ndarray) -> int:
        self.det.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self.det.detect(bgr)
        return 0 if faces is None else len(faces)

    def count(self, rgb: np.ndarray) -> int:
        cv2 = self.cv2
        bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        scale = max(1.0, self.min_side / min(bgr.shape[:2]))
        if scale > 1.0:
            bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        n = self._raw(bgr)
        if n == 0:
            pad = int(round(0.25 * max(bgr.shape[:2])))
            n = self._raw(cv2.copyMakeBorder(bgr, pad, pad, pad, pad, cv2.BORDER_REFLECT_101))
        return n


def key_seed(label: str, i: int) -> bytes:
    """Public, reproducible evaluation seeds (not secrets): sha256 of a label and index."""
    return hashlib.sha256(f"lite-eval:{label}:{i}".encode()).digest()


def tar_block(genuine: np.ndarray, thresholds: dict[float, float]) -> dict:
    """TAR at each threshold; failures to acquire (NaN) count as rejections."""
    g = np.nan_to_num(genuine, nan=-2.0)
    return {f"{far:g}": float(np.mean(g >= t)) for far, t in thresholds.items()} | {
        "n": int(g.size),
        "failed_to_acquire": int(np.isnan(genuine).sum()),
        "mean_cos": float(np.nanmean(genuine)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=ROOT / "tests" / "fixtures" / "bundles" / "lite")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--eval-models", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=ROOT / "data-cache")
    ap.add_argument("--pool", type=int, default=1000, help="extra images for generated non-mated pairs")
    ap.add_argument("--pairs-per-id", type=int, default=3)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--engine-steps", type=int, default=50)
    ap.add_argument("--timing-runs", type=int, default=3, help="timed runs (median reported) after a warm-up")
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--no-card", action="store_true", help="do not rewrite MODEL_CARD.md")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)
    data = args.shared / "data" / "lfw-dev"
    model_dir = args.eval_models or default_model_dir()
    if not data.is_dir() or model_dir is None:
        sys.exit(f"needs {data} and the evaluation models (../shared/models/eval)")
    ev = Evaluator(model_dir, threads=1)
    counter = FaceCounter(Path(model_dir))
    bundle = load_bundle(args.bundle, "cpu", components=["generator", "encoder", "identity"])
    G, E = bundle.generator, bundle.encoder
    res = int(G.resolution)
    cache = EmbedCache(ev, data, args.cache / "eval_embeddings.npz")
    results: dict = {"bundle_id": bundle.bundle_id, "resolution": res}
    rng = np.random.default_rng(args.seed)

    # ---- 1. thresholds from original non-mated pairs ---------------------------------------------------------
    t0 = time.time()
    pairs = [ln.split("\t") for ln in (args.shared / "data" / "lfw-dev-pairs.tsv").read_text().splitlines()[1:] if ln]
    nonmated = [(a, b) for _, m, a, b in pairs if m.strip() == "0"]
    mated = [(a, b) for _, m, a, b in pairs if m.strip() == "1"]
    ids = sorted(p.name for p in data.iterdir() if p.is_dir())
    pool_ids = rng.choice(len(ids), size=min(args.pool, len(ids)), replace=False)
    pool = []
    for i in sorted(pool_ids):
        photos = sorted((data / ids[i]).glob("*.jpg"))
        pool.append(str(photos[rng.integers(len(photos))].relative_to(data)))
    log(f"embedding originals: {len(nonmated)} listed non-mated pairs, {len(mated)} mated pairs, pool {len(pool)}")
    ea = cache.get([a for a, _ in nonmated])
    eb = cache.get([b for _, b in nonmated])
    s_listed = cos_rows(ea, eb)
    ep = cache.get(pool)
    names = np.array([r.split("/")[0] for r in pool])
    iu = np.triu_indices(len(pool), 1)
    s_pool = (ep @ ep.T)[iu][names[iu[0]] != names[iu[1]]]
    impostor = np.concatenate([s_listed, s_pool])
    impostor = impostor[~np.isnan(impostor)]
    thresholds = {far: threshold_at_far(impostor, far) for far in FARS}
    ma, mb = cache.get([a for a, _ in mated]), cache.get([b for _, b in mated])
    results["thresholds"] = {
        "n_nonmated_listed": int(np.sum(~np.isnan(s_listed))),
        "n_nonmated_generated": int(np.sum(~np.isnan(s_pool))),
        **{f"{far:g}": float(t) for far, t in thresholds.items()},
        "far_actual": {f"{far:g}": far_at(impostor, t) for far, t in thresholds.items()},
    }
    results["original_listed_mated_pairs"] = tar_block(cos_rows(ma, mb), thresholds)
    log(f"thresholds {results['thresholds']} ({time.time() - t0:.0f}s)")

    # ---- 2. reconstruction on holdout identities --------------------------------------------------------------
    t0 = time.time()
    chips = np.load(args.cache / f"lfw_chips_{res}.npy")
    rows = [ln.split("\t") for ln in (args.cache / f"lfw_chips_{res}.tsv").read_text().splitlines()]
    by_id: dict[str, list[int]] = {}
    for i, (_, name, _, _) in enumerate(rows):
        split = identity_split(name)
        if split != "train":
            by_id.setdefault(name, []).append(i)
    rec_pairs = []  # (row index of A, relpath of B)
    for _name, idx in sorted(by_id.items()):
        if len(idx) < 2:
            continue
        for k in range(min(args.pairs_per_id, len(idx) - 1)):
            rec_pairs.append((idx[k], rows[idx[k + 1]][2]))
    a_idx = np.array([a for a, _ in rec_pairs])
    with torch.no_grad():
        recon = np.concatenate(
            [to_uint8(G.synthesis(E(to_tensor(chips[a_idx[i : i + 64]])))) for i in range(0, len(a_idx), 64)]
        )
    log(f"reconstructing {len(rec_pairs)} holdout pairs, embedding")
    e_rec = embed_images(ev, recon)
    e_b = cache.get([b for _, b in rec_pairs])
    e_a = cache.get([rows[a][2] for a in a_idx])
    results["reconstruction"] = {
        "identities": len({rows[a][1] for a in a_idx}),
        "split": "lite holdout (sha256 % 10 == 3), never trained on",
        "recon_A_vs_orig_B": tar_block(cos_rows(e_rec, e_b), thresholds),
        "orig_A_vs_orig_B_ceiling": tar_block(cos_rows(e_a, e_b), thresholds),
        "recon_A_vs_orig_A": tar_block(cos_rows(e_rec, e_a), thresholds),
        "pixel_l1_chip": float(np.abs(recon.astype(np.float32) - chips[a_idx].astype(np.float32)).mean() / 127.5),
    }
    log(f"reconstruction {results['reconstruction']} ({time.time() - t0:.0f}s)")

    # ---- 3. key-derived samples ------------------------------------------------------------------------------
    t0 = time.time()
    from worker.algorithm.keylatent import key_latents

    seeds = [key_seed("sample", i) for i in range(args.samples)]
    for psi in (0.7, 1.0):  # 0.7 = the engine's truncation (the acceptance number); 1.0 = no truncation
        with torch.no_grad():
            wk = key_latents(G, seeds, psi=psi)
            samples = np.concatenate([to_uint8(G.synthesis(wk[i : i + 50])) for i in range(0, len(wk), 50)])
        counts = np.array([counter.count(s) for s in samples])
        e_s = embed_images(ev, samples)
        ok = ~np.isnan(e_s[:, 0])
        es = e_s[ok]
        iu = np.triu_indices(len(es), 1)
        s_ss = (es @ es.T)[iu]
        block = {
            "n": int(args.samples),
            "psi": psi,
            "exactly_one_face": float(np.mean(counts == 1)),
            "no_face": float(np.mean(counts == 0)),
            "several_faces": float(np.mean(counts > 1)),
            "judge_failed_to_acquire": int((~ok).sum()),
            "different_key_pairs": int(s_ss.size),
            "different_key_match_rate_far1e-3": float(np.mean(s_ss >= thresholds[1e-3])),
            "different_key_match_rate_far1e-2": float(np.mean(s_ss >= thresholds[1e-2])),
            "mean_cos": float(s_ss.mean()),
        }
        results["key_samples" if psi == 0.7 else f"key_samples_psi{psi:g}"] = block
        log(f"key samples {block} ({time.time() - t0:.0f}s)")

    # ---- 4. engine timing + grid -------------------------------------------------------------------------------
    grid_faces = a_idx[np.linspace(0, len(a_idx) - 1, 8).round().astype(int)]
    x = to_tensor(chips[grid_faces])
    with torch.no_grad():
        w_real = E(x)
        rec_g = G.synthesis(w_real)
        wk8 = key_latents(G, [key_seed("grid", i) for i in range(8)], psi=0.7)
        synth = G.synthesis(wk8)
        mixed_w = w_real.clone()
        mixed_w[:, :4] = wk8[:, :4]
        mixed = G.synthesis(mixed_w)
    rows_img = [to_uint8(x), to_uint8(rec_g)]
    if not args.no_engine:
        try:
            from worker.algorithm.config import EngineConfig
            from worker.algorithm.pipeline import Engine
            from worker.bundle_config import deployed_config

            torch.set_num_threads(2)
            # the configuration a worker deploys for this bundle (its manifest advice), without the attribute loss
            cfg = dataclasses.replace(
                deployed_config(args.bundle, args.engine_steps, None), w_attr=0.0, mixed_precision=False
            )
            engine = Engine(bundle, cfg, torch.device("cpu"))
            Engine(bundle, EngineConfig(steps=2, w_attr=0.0), torch.device("cpu")).enroll(x[:1], key_seed("warm", 0))
            times: dict[int, list[float]] = {}
            for threads in (2, 1):  # 2 = the machine; 1 avoids OpenMP barrier stalls when the cores are contended
                torch.set_num_threads(threads)
                times[threads] = []
                for i in range(args.timing_runs):
                    t1 = time.time()
                    engine.enroll(x[:1], key_seed("timing", i))
                    times[threads].append(time.time() - t1)
            torch.set_num_threads(2)
            results["engine"] = {
                "steps": args.engine_steps,
                "seconds_one_face_2_threads": float(np.median(times[2])),
                "seconds_one_face_1_thread": float(np.median(times[1])),
                "seconds_runs": {str(k): [round(t, 2) for t in v] for k, v in times.items()},
                "load_average_1min": os.getloadavg()[0],
                "split": engine.split.describe(),
                "attribute_loss": "off (no attribute model)",
            }
            log(f"engine: one {args.engine_steps}-step anonymisation {results['engine']}")
            for key in ("A", "B"):  # each grid face is its own subject; all under one key per row
                outs = engine.enroll_many([(x[i : i + 1], key_seed("key" + key, 0)) for i in range(len(x))])
                rows_img.append(to_uint8(torch.cat([o.images for o in outs])))
            torch.set_num_threads(1)
        except Exception as exc:  # the engine is another module; report and continue
            results["engine"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            log(f"engine unavailable: {results['engine']['error']}")
    rows_img += [to_uint8(synth), to_uint8(mixed)]
    tile = 2 * res
    grid = np.zeros((len(rows_img) * tile, 8 * tile, 3), np.uint8)
    for r, row in enumerate(rows_img):
        for c, im in enumerate(row):
            grid[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = np.asarray(
                Image.fromarray(im).resize((tile, tile), Image.BICUBIC)
            )
    Image.fromarray(grid).save(args.bundle / "grid.png")
    results["grid_rows"] = (
        ["original (holdout)", "reconstruction"]
        + (["cancelable key A", "cancelable key B"] if len(rows_img) == 6 else [])
        + ["key-derived synthetic", "layer-mixed: layers 0-3 from a key, 4+ from the real face"]
    )

    (args.bundle / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    log("wrote eval.json and grid.png")
    if not args.no_card:
        write_card(args.bundle / "MODEL_CARD.md", results)
    print(json.dumps(results, indent=2))


def write_card(path: Path, r: dict) -> None:
    """Replace the measured section of the model card (between the markers) with ``r``."""
    th, rec, ks = r["thresholds"], r["reconstruction"], r["key_samples"]
    f = rec["recon_A_vs_orig_B"]
    c = rec["orig_A_vs_orig_B_ceiling"]
    s = rec["recon_A_vs_orig_A"]
    o = r["original_listed_mated_pairs"]
    lines = [
        CARD_BEGIN,
        f"Measured by `research/eval_lite.py` on bundle `{r['bundle_id']}` ({time.strftime('%Y-%m-%d')}). "
        "Judge: YuNet + "
        "ArcFace-template alignment + MobileFaceNet (../shared/models/eval), cosine; never used in training.",
        "",
        f"- Thresholds from original non-mated pairs: {th['n_nonmated_listed']} listed in lfw-dev-pairs.tsv + "
        f"{th['n_nonmated_generated']} generated (cross-identity pairs of one photo each of 1,000 random "
        f"identities): FAR 1e-2 -> {th['0.01']:.4f}, FAR 1e-3 -> {th['0.001']:.4f}.",
        f"- Original vs original, the 3,000 listed mated pairs: TAR {o['0.01']:.1%} @ FAR 1e-2, "
        f"{o['0.001']:.1%} @ 1e-3.",
        f"- Reconstruction of photo A vs another original photo B of the same person ({f['n']} pairs, "
        f"{rec['identities']} holdout identities never trained on): **TAR {f['0.01']:.1%} @ FAR 1e-2** "
        f"(acceptance >= 50 %), {f['0.001']:.1%} @ FAR 1e-3; failures to acquire {f['failed_to_acquire']}.",
        f"- Ceiling, original A vs original B on the same pairs: TAR {c['0.01']:.1%} @ 1e-2, {c['0.001']:.1%} @ 1e-3.",
        f"- Reconstruction of A vs original A: TAR {s['0.01']:.1%} @ 1e-2, {s['0.001']:.1%} @ 1e-3 "
        f"(mean cosine {s['mean_cos']:.3f}); mean pixel L1 on the chip {rec['pixel_l1_chip']:.3f} (range [-1, 1]).",
        f"- {ks['n']} key-derived samples (psi 0.7): YuNet finds exactly one face in **{ks['exactly_one_face']:.1%}** "
        f"(acceptance >= 95 %; none: {ks['no_face']:.1%}, several: {ks['several_faces']:.1%}); pairs from different "
        f"keys matching at FAR 1e-3: **{ks['different_key_match_rate_far1e-3']:.2%}** of {ks['different_key_pairs']} "
        f"(acceptance <= 1 %); at FAR 1e-2: {ks['different_key_match_rate_far1e-2']:.2%}; mean cosine "
        f"{ks['mean_cos']:.3f}.",
    ]
    k1 = r.get("key_samples_psi1")
    if k1:
        lines.append(
            f"- Same seeds without truncation (psi 1.0): exactly one face {k1['exactly_one_face']:.1%}, different-key "
            f"pairs matching at FAR 1e-3 {k1['different_key_match_rate_far1e-3']:.2%}, "
            f"mean cosine {k1['mean_cos']:.3f}."
        )
    eng = r.get("engine", {})
    if "seconds_one_face_2_threads" in eng:
        lines.append(
            f"- One {eng['steps']}-step anonymisation of one face (Engine.enroll, split `{eng['split']}`, "
            f"no attribute loss), CPU, on the shared 2-core machine: {eng['seconds_one_face_2_threads']:.1f} s with 2 "
            f"torch threads, {eng['seconds_one_face_1_thread']:.1f} s with 1 "
            f"(median of {len(eng['seconds_runs']['2'])} runs each after a warm-up; "
            f"1-min load average {eng['load_average_1min']:.1f}; acceptance <= 30 s)."
        )
    elif eng:
        lines.append(f"- Engine timing not measured: {eng.get('error')}")
    lines.append(CARD_END)
    text = path.read_text() if path.is_file() else f"# Lite bundle\n\n{CARD_BEGIN}\n{CARD_END}\n"
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        tail = rest.split(CARD_END, 1)[1]
        text = head + "\n".join(lines) + tail
    else:
        text = text.rstrip() + "\n\n## Measured\n\n" + "\n".join(lines) + "\n"
    path.write_text(text)
    log(f"updated {path}")


if __name__ == "__main__":
    main()
