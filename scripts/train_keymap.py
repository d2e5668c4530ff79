"""Train the key map of the "keymap" bundle against the frozen DCGAN of gan-face-generate and dlib's ResNet.

1. identity-space statistics: dlib mean direction and whitened top-k PCA of real faces' identity components
   (``scripts/keymap_embed_lfw.py`` output: lfw-dev TRAIN identities only), and of the generator's own samples;
2. the MLP ``(key-rotated target, nuisance) -> z``: each step draws a batch of real identities, ONE random Haar
   rotation for the batch (a key), nuisance codes shared by pairs of samples (two people under one key), and
   minimises mean(1 - cos(c_g(G(z)), t)) + w_nce InfoNCE(tau) + w_prior (|z|^2/d - 1)^2.

One torch thread, checkpoints every ``--ckpt-every`` seconds, resumes from ``<run>/ckpt.pt``, stops at ``--steps``
or ``--stop-at`` (UTC HH:MM), then writes ``<out>/keymap.pt``. The evaluation judge takes no part.

    PYTHONPATH=. nohup .venv/bin/python scripts/train_keymap.py --stop-at 06:20 > runs/keymap.log 2>&1 &

Against the fine-tuned generator (``scripts/finetune_generator.py``):
``--generator-delta research/generator-finetune/dcgan_finetune_delta.pt`` (the generator statistics are refitted on
its samples and the written manifest enables the delta), optionally ``--init <keymap.pt>`` to start from an existing
key map's MLP instead of from scratch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import torch

from worker.algorithm.keymap import KeyMapModel, identity_loss, info_nce, prior_penalty, save_keymap
from worker.models.bundle import resolve_path
from worker.models.dcgan import ALIGNMENT, load_dcgan
from worker.models.dlib_resnet import load_dlib_resnet

REPO = Path(__file__).resolve().parents[1]
DCGAN_PATH = "pkg://gan_face_generate/weights.tar"


def pca(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k principal directions (D, k) and standard deviations (k,) of rows of x (already ~zero mean)."""
    x = x.double() - x.double().mean(0)
    _, s, vt = torch.linalg.svd(x, full_matrices=False)
    return vt[:k].T.float().contiguous(), (s[:k] / (len(x) - 1) ** 0.5).float()


def z_spread_penalty(z: torch.Tensor) -> torch.Tensor:
    """Anti-collapse in the generator's latent space: codes of a batch should look like independent N(0, I) draws
    (pairwise cosine ~0, batch mean ~0). The key map otherwise converges to one region of z (one average face
    family that the in-loss recognizer separates but another recognizer does not)."""
    zn = torch.nn.functional.normalize(z, dim=-1)
    cos = zn @ zn.T
    off = cos[~torch.eye(len(z), dtype=torch.bool)]
    return off.pow(2).mean() + z.mean(0).pow(2).mean()


def haar(k: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    s = torch.sign(torch.diagonal(r))
    s[s == 0] = 1
    return (q * s[None]).float()


def fit_stats(model: KeyMapModel, real: torch.Tensor, gen, dlib, n_gen: int, g: torch.Generator) -> dict:
    real = torch.nn.functional.normalize(real, dim=-1)
    model.mean_dir.copy_(torch.nn.functional.normalize(real.mean(0), dim=0))
    b, s = pca(model.identity_component(real), model.k)
    model.real_basis.copy_(b)
    model.real_std.copy_(s)
    embs = []
    with torch.no_grad():
        for i in range(0, n_gen, 64):
            z = torch.randn(min(64, n_gen - i), model.z_dim, generator=g)
            embs.append(dlib.embed(gen(z), ALIGNMENT))
    ge = torch.cat(embs)
    b, s = pca(model.identity_component(ge), model.k)
    model.gen_basis.copy_(b)
    model.gen_std.copy_(s)
    m = model.mean_dir
    share = float(
        (
            (model.identity_component(real) @ model.gen_basis).pow(2).sum(1)
            / model.identity_component(real).pow(2).sum(1)
        ).mean()
    )
    return {
        "real_cos_to_mean": float((real @ m).mean()),
        "gen_cos_to_mean": float((ge @ m).mean()),
        "n_real": len(real),
        "n_gen": len(ge),
        "real_share_in_gen_topk": share,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--emb", default=str(REPO / "data-cache" / "keymap_lfw_dlib.npz"))
    ap.add_argument("--run", default=str(REPO / "runs" / "keymap"))
    ap.add_argument("--out", default=str(REPO / "worker" / "bundles" / "keymap"))
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--nuisance-dim", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--w-nce", type=float, default=0.2)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--w-prior", type=float, default=0.1)
    ap.add_argument("--w-unif", type=float, default=1.0, help="anti-collapse in z: mean pairwise cos^2 + |mean z|^2/d")
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--stop-at", default=None, help="UTC HH:MM")
    ap.add_argument("--ckpt-every", type=float, default=180.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--finalize-only", action="store_true")
    ap.add_argument("--generator-delta", default=None, help="fine-tune delta of the DCGAN (finetune_generator.py)")
    ap.add_argument("--init", default=None, help="start from this keymap.pt's MLP (not from scratch)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    gen_config: dict = {"delta": {"path": str(Path(args.generator_delta).resolve())}} if args.generator_delta else {}
    gen = load_dcgan(resolve_path(REPO, DCGAN_PATH), gen_config).eval().requires_grad_(False)
    dlib = load_dlib_resnet().eval().requires_grad_(False)
    data = np.load(args.emb)
    real = torch.from_numpy(data["emb"]).float()
    model = KeyMapModel(k=args.k, nuisance_dim=args.nuisance_dim, hidden=args.hidden, z_dim=gen.z_dim)
    opt = torch.optim.Adam(model.mlp.parameters(), lr=args.lr, betas=(0.9, 0.99))
    ckpt_path = run / "ckpt.pt"
    step, stats, log = 0, {}, []
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, stats, log = ck["step"], ck["stats"], ck["log"]
        g.set_state(ck["rng"])
        print(f"resumed at step {step}", flush=True)
    else:
        if args.init:
            init = torch.load(args.init, map_location="cpu", weights_only=True)["state"]
            model.mlp.load_state_dict({k[len("mlp.") :]: v for k, v in init.items() if k.startswith("mlp.")})
        t = time.time()
        stats = fit_stats(model, real, gen, dlib, args.n_gen, g)
        stats["fit_seconds"] = time.time() - t
        print("stats", json.dumps(stats), flush=True)
    real_c = model.real_coords(real).detach()
    stop = None
    if args.stop_at:
        hh, mm = (int(x) for x in args.stop_at.split(":"))
        now = dt.datetime.now(dt.UTC)
        stop = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if stop < now:
            stop += dt.timedelta(days=1)

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "stats": stats,
                "log": log,
                "rng": g.get_state(),
                "args": vars(args),
            },
            tmp,
        )
        tmp.replace(ckpt_path)

    last_ckpt = time.time()
    t0 = time.time()
    run_avg: dict[str, float] = {}
    while not args.finalize_only and step < args.steps and (stop is None or dt.datetime.now(dt.UTC) < stop):
        b = args.batch
        idx = torch.randint(0, len(real_c), (b,), generator=g)
        c = real_c[idx] @ haar(args.k, g).T
        t = torch.nn.functional.normalize(c, dim=-1)
        nu = torch.randn(b // 2, args.nuisance_dim, generator=g).repeat_interleave(2, 0)[:b]
        z = model(t, nu)
        e = dlib.embed(gen(z), ALIGNMENT)
        l_id = identity_loss(model, e, t).mean()
        l_nce = info_nce(model.gen_coords(e), t, args.tau)
        l_prior = prior_penalty(z).mean()
        l_unif = z_spread_penalty(z)
        loss = l_id + args.w_nce * l_nce + args.w_prior * l_prior + args.w_unif * l_unif
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.mlp.parameters(), 1.0)
        opt.step()
        step += 1
        for k_, v in (("id", l_id), ("nce", l_nce), ("prior", l_prior), ("unif", l_unif)):
            run_avg[k_] = 0.95 * run_avg.get(k_, float(v.detach())) + 0.05 * float(v.detach())
        if step % 10 == 0:
            rec = {
                "step": step,
                "time": time.time() - t0,
                **{k_: round(v, 4) for k_, v in run_avg.items()},
                "znorm": round(float(z.detach().pow(2).mean().sqrt()), 3),
            }
            log.append(rec)
            print(json.dumps(rec), flush=True)
        if time.time() - last_ckpt > args.ckpt_every:
            save()
            last_ckpt = time.time()
    if not args.finalize_only:  # a finalize beside a running training must not overwrite its checkpoint
        save()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_keymap(
        model, out / "keymap.pt", {"steps": step, "stats": stats, "args": vars(args), "final": log[-1] if log else None}
    )
    print(f"wrote {out / 'keymap.pt'} at step {step}", flush=True)
    delta = None
    if args.generator_delta:
        dpath = Path(args.generator_delta).resolve()
        rel = dpath.relative_to(out.resolve()) if dpath.is_relative_to(out.resolve()) else dpath
        delta = {"path": str(rel), "enabled": True}
    write_bundle_manifest(out, delta=delta)
    print(f"wrote {out / 'manifest.json'}", flush=True)


def write_bundle_manifest(out: Path, engine: dict | None = None, delta: dict | None = None) -> Path:
    """``<out>/manifest.json``: the packaged DCGAN (pkg://, hash pinned), the key map, dlib's ResNet; engine advice
    kept from an existing manifest (steps, lr, verify threshold) unless given. The generator's fine-tune ``delta``
    entry (``{"path", "enabled"}``) is ``delta`` when given, else the existing manifest's (re-hashed)."""
    from worker.models.bundle import manifest_for, sha256_file

    mpath = out / "manifest.json"
    old = json.loads(mpath.read_text()) if mpath.is_file() else {}
    components = {
        "generator": {"format": "dcgan-gan-face-generate", "path": DCGAN_PATH, "config": {"z_dim": 100, "ngf": 64}},
        "encoder": {"format": "keymap-mlp", "path": "keymap.pt", "config": {}},
        "identity": {
            "format": "dlib-resnet",
            "path": "pkg://face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
            "config": {"embedding_dim": 128, "input_size": 150},
        },
    }
    old_delta = old.get("components", {}).get("generator", {}).get("config", {}).get("delta")
    if delta or old_delta:
        components["generator"]["config"]["delta"] = dict(delta or old_delta)
    bundle_id = "keymap-dcgan64-" + sha256_file(out / "keymap.pt")[:12]
    manifest = manifest_for(out, components, bundle_id)
    manifest["engine"] = engine or old.get("engine") or {"steps": 20, "lr": 0.05, "key_target": False}
    for extra in ("calibration",):
        if extra in old:
            manifest[extra] = old[extra]
    mpath.write_text(json.dumps(manifest, indent=2) + "\n")
    return mpath


if __name__ == "__main__":
    main()
