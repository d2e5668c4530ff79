"""Fit the keymap bundle's MobileFaceNet-space statistics (``worker.algorithm.keymap_mfn.MfnSpace``).

Real faces: lfw-dev TRAIN identities only (neither validation, sha256 % 10 == 0, nor holdout, % 10 == 3), aligned
as the engine does (dlib detector -> 150 px dlib chip), embedded by the MFN port through the differentiable warp to
its ArcFace 112 px crop. Generator: ``--n-gen`` DCGAN samples z ~ N(0, I), embedded by the MFN (64 px -> 112 px)
and by dlib (for ``link``: least squares from whitened dlib generator coordinates of the shipped key map to
whitened MFN generator coordinates). The evaluation judge takes no part.

    PYTHONPATH=. .venv/bin/python scripts/keymap_mfn_fit.py --out runs/mfn/keymap_mfn.pt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def pca(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double() - x.double().mean(0)
    _, s, vt = torch.linalg.svd(x, full_matrices=False)
    return vt[:k].T.float().contiguous(), (s[:k] / (len(x) - 1) ** 0.5).float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lfw-dev"))
    ap.add_argument("--bundle", default=str(REPO / "worker" / "bundles" / "keymap"))
    ap.add_argument("--max-per-id", type=int, default=1)
    ap.add_argument("--limit", type=int, default=2500)
    ap.add_argument("--n-gen", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--out", default=str(REPO / "runs" / "mfn" / "keymap_mfn.pt"))
    ap.add_argument("--real-from", default=None, help="take the real-face statistics from this earlier fit")
    ap.add_argument("--cache", default=str(REPO / "data-cache" / "keymap_mfn_emb.npz"), help="embeddings, reused")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from worker.algorithm.keymap_mfn import MfnSpace, save_mfn_space
    from worker.evaluation.evaluator import load_rgb
    from worker.models.bundle import load_bundle
    from worker.models.dlib_face import prepare_face
    from worker.models.lite import is_lite_holdout_identity, is_validation_identity
    from worker.models.mobilefacenet import load_mobilefacenet

    mfn = load_mobilefacenet()
    bundle = load_bundle(args.bundle)
    gen, dlib, km = bundle.generator.eval(), bundle.identity.eval(), bundle.encoder.eval()
    paths = []
    for d in sorted(p for p in Path(args.data).iterdir() if p.is_dir()):
        if is_validation_identity(d.name) or is_lite_holdout_identity(d.name):
            continue
        paths += sorted(d.glob("*.jpg"))[: args.max_per_id]
    rng = np.random.default_rng(args.seed)
    rng.shuffle(paths)
    paths = paths[: args.limit]
    t0 = time.time()
    cache = Path(args.cache)
    cached = np.load(cache) if cache.is_file() else None
    real, batch = [], []

    def flush() -> None:
        if batch:
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            with torch.no_grad():
                real.append(mfn.embed(x, "dlib-chip"))
            batch.clear()

    skip_real = (cached is not None and len(cached["e_real"]) > 0) or args.real_from is not None
    for i, p in enumerate([] if skip_real else paths):
        try:
            batch.append(prepare_face(load_rgb(p), 150, "dlib-chip"))
        except Exception:  # no face / several faces: skip
            pass
        if len(batch) == 32:
            flush()
        if i % 500 == 0:
            print(f"real {i}/{len(paths)} {time.time() - t0:.0f}s", flush=True)
    flush()
    prev_ckpt = torch.load(args.real_from, weights_only=False) if args.real_from else None
    prev = prev_ckpt["state"] if prev_ckpt else None  # real-face buffers only (earlier files may lack newer ones)
    prev_meta = prev_ckpt.get("meta", {}) if prev_ckpt else {}
    if cached is not None and "e_real" in cached and len(cached["e_real"]):
        e_real = torch.from_numpy(cached["e_real"])
    elif prev is not None:
        e_real = torch.zeros(0, prev["mean_dir"].shape[0])
    else:
        e_real = torch.cat(real)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, e_real=e_real.numpy())
    if cached is not None and "e_gen" in cached:
        e_gen_t, c_dlib_t = torch.from_numpy(cached["e_gen"]), torch.from_numpy(cached["c_dlib"])
    else:
        g = torch.Generator().manual_seed(args.seed)
        e_gen, c_dlib = [], []
        with torch.no_grad():
            for i in range(0, args.n_gen, 64):
                img = gen(torch.randn(min(64, args.n_gen - i), gen.z_dim, generator=g))
                e_gen.append(mfn.embed(img, gen.alignment))
                c_dlib.append(km.gen_coords(dlib.embed(img, gen.alignment)))
        e_gen_t, c_dlib_t = torch.cat(e_gen), torch.cat(c_dlib)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, e_real=e_real.numpy(), e_gen=e_gen_t.numpy(), c_dlib=c_dlib_t.numpy())
    print(f"gen {len(e_gen_t)} {time.time() - t0:.0f}s", flush=True)
    space = MfnSpace(emb_dim=e_real.shape[1], k=args.k, k_dlib=km.k)
    if prev is not None:
        for name in ("mean_dir", "real_basis", "real_std"):
            getattr(space, name).copy_(prev[name])
    else:
        space.mean_dir.copy_(torch.nn.functional.normalize(e_real.mean(0), dim=0))
        b, s = pca(space.identity_component(e_real), args.k)
        space.real_basis.copy_(b)
        space.real_std.copy_(s)
    u_gen = space.identity_component(e_gen_t)
    space.gen_center.copy_(u_gen.mean(0))
    b, s = pca(u_gen, args.k)
    space.gen_basis.copy_(b)
    space.gen_std.copy_(s)
    c_mfn = space.gen_coords(e_gen_t)
    xd = torch.nn.functional.normalize(c_dlib_t, dim=-1).double()
    yd = torch.nn.functional.normalize(c_mfn, dim=-1).double()
    link = torch.linalg.solve(xd.T @ xd + 1e-3 * len(xd) * torch.eye(xd.shape[1], dtype=torch.float64), xd.T @ yd)
    space.link.copy_(link.float())
    pred = torch.nn.functional.normalize(xd @ link, dim=-1)
    m = space.mean_dir
    stats = {
        "n_real": len(e_real) if prev is None else prev_meta.get("stats", {}).get("n_real"),
        "n_gen": len(e_gen_t),
        "real_cos_to_mean": round(float((torch.nn.functional.normalize(e_real, dim=-1) @ m).mean()), 4)
        if len(e_real)
        else prev_meta.get("stats", {}).get("real_cos_to_mean"),
        "gen_cos_to_mean": round(float((torch.nn.functional.normalize(e_gen_t, dim=-1) @ m).mean()), 4),
        "link_fit_cos": round(float((pred * yd).sum(-1).mean()), 4),
        "gen_center_norm": round(float(space.gen_center.norm()), 4),
        "gen_center_in_basis_over_std": round(float((space.gen_center @ space.gen_basis / space.gen_std).norm()), 3),
        "seconds": round(time.time() - t0, 1),
    }
    print("stats", json.dumps(stats), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_mfn_space(space, out, {"stats": stats, "args": vars(args)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
