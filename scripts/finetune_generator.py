"""Fine-tune the 64 px DCGAN of gan-face-generate toward real faces (lfw-dev TRAIN identities), in the background.

Why: the package generator's faces share one look, so different people's cancelable faces match each other far more
often than real photos do. Adversarial fine-tuning toward real faces widens the face space.

Data: every photo of the lfw-dev identities the project trains on (``worker.evaluation.splits.identity_split(name) ==
"train"``: neither VALIDATION, sha256 % 10 == 0, nor the evaluation holdout, % 10 == 3), aligned like the generator's
faces: dlib HOG detection (no upsampling; one upsampling retry) + dlib's 5 landmarks -> the "arcface-112" crop at
64 px (``worker.models.dlib_face.align_face``). Cached once as ``<out>/lfw_train_arcface64.npz`` (uint8 (N, 64, 64,
3) RGB). The evaluation judge takes no part in anything here.

Training (all choices for a gentle fine-tune of a pretrained generator on ~8k images):
- G: the package's weights, batch norm frozen (eval mode: running statistics, so a face never depends on its batch
  mates), every other parameter trained; Adam lr ``--lr-g``, betas (0, 0.99).
- D: a DCGAN-style 64 px discriminator trained here from scratch, spectral norm on every layer (``--no-sn`` off),
  lazy R1 penalty on real images (``--r1`` gamma, every ``--r1-every`` steps); Adam lr ``--lr-d``, betas (0, 0.99).
- Loss: non-saturating logistic; real photos mirror-flipped at random; DiffAugment-style differentiable augmentation
  (colour, translation, cutout) applied to real and generated images alike before D (G's gradient flows through).
- EMA of G (``--ema-half-life`` steps), the weights to use.
- Optional ``--anchor``: L2 pull of G's parameters toward the package weights (keeps the delta small).

Checkpoints: ``<out>/last.pt`` (G, EMA, D, both optimisers, step, all RNG states) every ``--ckpt-minutes``, written
atomically; ``<out>/ema_<step>.pt`` (EMA G state dict) every ``--snapshot-every`` steps for the training curve.
``--resume`` continues from ``last.pt``. One torch thread.

Export (the bundle's artefact): ``--export-delta <snapshot or last.pt> --delta-out <file>`` writes the EMA weights
minus the package weights as float16 (``worker.models.dcgan.apply_delta`` format; unchanged tensors left out).

    nohup nice -n 19 env OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python scripts/finetune_generator.py \\
        --out /work/runs/gan-finetune [--resume] > /work/runs/gan-finetune/train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DCGAN_PATH = "pkg://gan_face_generate/weights.tar"
CACHE_NAME = "lfw_train_arcface64.npz"


# --- data -------------------------------------------------------------------------------------------------------
def train_photos(data: Path) -> list[tuple[str, Path]]:
    """(identity, photo) of every lfw-dev TRAIN identity (never VALIDATION or the evaluation holdout)."""
    from worker.evaluation.splits import identity_split

    out = []
    for d in sorted(p for p in data.iterdir() if p.is_dir()):
        if identity_split(d.name) == "train":
            out.extend((d.name, p) for p in sorted(d.glob("*.jpg")))
    return out


def align_one(rgb: np.ndarray, detector, size: int) -> np.ndarray | None:
    """One photo -> (size, size, 3) uint8 arcface-112 crop of its subject, or None (no face / several faces)."""
    from worker.models import dlib_face as df

    faces = []
    for upsample in (0, 1):
        rects, scores, _ = detector.run(rgb, upsample, 0.0)
        if len(rects):
            break
    if not len(rects):
        return None
    sp5 = df._get("sp5")
    for rect, score in zip(rects, scores, strict=True):
        shape = sp5(rgb, rect)
        pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)
        box = (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)
        faces.append(df.DetectedFace(box=box, score=float(score), landmarks=pts))
    try:
        face = df.select_face(faces, rgb.shape[:2])
    except (df.NoFaceError, df.MultipleFacesError):
        return None
    return df.align_face(rgb, face, size, "arcface-112")


def build_cache(data: Path, path: Path, size: int = 64) -> np.ndarray:
    """Align every TRAIN photo once; returns uint8 (N, size, size, 3) and writes ``path`` (npz, with names)."""
    import dlib

    from worker.evaluation.evaluator import load_rgb

    detector = dlib.get_frontal_face_detector()
    photos = train_photos(data)
    crops, names, skipped = [], [], 0
    t0 = time.time()
    for i, (name, p) in enumerate(photos):
        crop = align_one(load_rgb(p), detector, size)
        if crop is None:
            skipped += 1
        else:
            crops.append(crop)
            names.append(name)
        if (i + 1) % 500 == 0:
            print(f"align {i + 1}/{len(photos)} skipped {skipped} {time.time() - t0:.0f}s", flush=True)
    arr = np.stack(crops)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=arr, names=np.array(names))
    os.replace(tmp, path)
    n_ids = len(set(names))
    print(f"aligned {len(arr)} photos of {n_ids} TRAIN identities ({skipped} skipped) in {time.time() - t0:.0f}s")
    return arr


# --- discriminator and augmentation -----------------------------------------------------------------------------
class Discriminator(nn.Module):
    """64 px DCGAN-style discriminator: (B, 3, 64, 64) in [-1, 1] -> logits (B,). No batch norm (R1-friendly)."""

    def __init__(self, ndf: int = 64, sn: bool = True) -> None:
        super().__init__()
        wrap = nn.utils.parametrizations.spectral_norm if sn else (lambda m: m)
        chans = [3, ndf, ndf * 2, ndf * 4, ndf * 8]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [wrap(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(wrap(nn.Conv2d(chans[-1], 1, 4, 1, 0)))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).flatten()


def augment(x: torch.Tensor, policy: set[str]) -> torch.Tensor:
    """Differentiable augmentation of (B, 3, H, W) in [-1, 1], an independent draw per sample.

    colour: brightness +-0.25 (image units of [-1, 1] / 2), saturation x[0, 2], contrast x[0.5, 1.5];
    translation: integer shift up to 1/8 of the side, zero fill; cutout: one zero square of half the side.
    """
    b, _, h, w = x.shape
    dev = x.device
    if "color" in policy:
        x = x + (torch.rand(b, 1, 1, 1, device=dev) - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (torch.rand(b, 1, 1, 1, device=dev) * 2) + mean
        mean = x.mean(dim=[1, 2, 3], keepdim=True)
        x = (x - mean) * (torch.rand(b, 1, 1, 1, device=dev) + 0.5) + mean
    if "translation" in policy:
        s = h // 8
        dx = torch.randint(-s, s + 1, (b,), device=dev)
        dy = torch.randint(-s, s + 1, (b,), device=dev)
        padded = F.pad(x, (s, s, s, s))
        iy = (torch.arange(h, device=dev)[None, :] + s - dy[:, None]).clamp(0, h + 2 * s - 1)  # (B, H)
        ix = (torch.arange(w, device=dev)[None, :] + s - dx[:, None]).clamp(0, w + 2 * s - 1)  # (B, W)
        rows = padded.gather(2, iy[:, None, :, None].expand(b, 3, h, w + 2 * s))
        x = rows.gather(3, ix[:, None, None, :].expand(b, 3, h, w))
    if "cutout" in policy:
        ch, cw = h // 2, w // 2
        cy = torch.randint(0, h + 1 - ch % 2, (b, 1, 1), device=dev)
        cx = torch.randint(0, w + 1 - cw % 2, (b, 1, 1), device=dev)
        yy = torch.arange(h, device=dev)[None, :, None]
        xx = torch.arange(w, device=dev)[None, None, :]
        inside = ((yy - cy).abs() < ch // 2) & ((xx - cx).abs() < cw // 2)
        x = x * (~inside)[:, None].to(x.dtype)
    return x


# --- state ------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_delta(snapshot: Path, out: Path) -> dict:
    """EMA weights of ``snapshot`` minus the package weights -> float16 delta file; returns its meta."""
    from worker.models.bundle import resolve_path, sha256_file
    from worker.models.dcgan import DELTA_FORMAT, load_dcgan

    base_path = resolve_path(REPO, DCGAN_PATH)
    base = load_dcgan(base_path).state_dict()
    ck = torch.load(snapshot, map_location="cpu", weights_only=False)
    tuned = ck["ema"] if "ema" in ck else ck
    delta = {}
    for k, v in tuned.items():
        if v.is_floating_point() and not torch.equal(v, base[k]):
            delta[k] = (v.float() - base[k].float()).half().contiguous()
    meta = {
        "source": "scripts/finetune_generator.py (EMA generator)",
        "step": int(ck.get("step", -1)),
        "args": json.dumps(ck.get("args", {}), sort_keys=True, default=str),
        "data": "lfw-dev TRAIN identities (not VALIDATION sha256 % 10 == 0, not holdout % 10 == 3)",
        "licence": "inherits the gan-face-generate weights' licence: non-commercial research only (DigiFace-1M)",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"format": DELTA_FORMAT, "version": 1, "base_sha256": sha256_file(base_path), "delta": delta, "meta": meta},
        out,
    )
    n = sum(v.numel() for v in delta.values())
    print(f"{out}: {len(delta)} tensors, {n} values, {out.stat().st_size} bytes, sha256 {sha256_file(out)}")
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/work/runs/gan-finetune")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lfw-dev"))
    ap.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr-g", type=float, default=2e-5)
    ap.add_argument("--lr-d", type=float, default=2e-4)
    ap.add_argument("--ema-half-life", type=float, default=500.0, help="steps")
    ap.add_argument("--r1", type=float, default=1.0, help="R1 gamma on real images (0 = off)")
    ap.add_argument("--r1-every", type=int, default=8)
    ap.add_argument("--no-sn", action="store_true", help="no spectral norm on D")
    ap.add_argument("--aug", default="color,translation,cutout", help="comma list or 'none'")
    ap.add_argument("--anchor", type=float, default=0.0, help="L2 pull of G toward the package weights")
    ap.add_argument("--ckpt-minutes", type=float, default=3.0)
    ap.add_argument("--snapshot-every", type=int, default=250)
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--stop-at", default=None, help="UTC HH:MM")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--export-delta", default=None, help="snapshot to export as a float16 delta (no training)")
    ap.add_argument("--delta-out", default=str(REPO / "research" / "generator-finetune" / "dcgan_finetune_delta.pt"))
    args = ap.parse_args()
    if args.export_delta:
        torch.set_num_threads(1)
        export_delta(Path(args.export_delta), Path(args.delta_out))
        return

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    import cv2

    cv2.setNumThreads(1)
    from worker.models.bundle import resolve_path
    from worker.models.dcgan import load_dcgan

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ck = None
    if args.resume and (out / "last.pt").is_file():
        ck = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
        # options left at their defaults on the command line take the checkpoint's values (same run, same knobs)
        fixed = ("resume", "export_delta", "delta_out", "stop_at", "max_steps")
        for k, v in ck.get("args", {}).items():
            if k not in fixed and hasattr(args, k) and getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    cache = out / CACHE_NAME
    if cache.is_file():
        real_np = np.load(cache)["images"]
    else:
        real_np = build_cache(Path(args.data), cache)
    real = torch.from_numpy(real_np).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()  # (N, 3, 64, 64)
    print(f"real faces: {tuple(real.shape)}", flush=True)

    base_path = resolve_path(REPO, DCGAN_PATH)
    g = load_dcgan(base_path, {"z_dim": 100, "ngf": 64})
    g.eval()  # batch norm frozen: running statistics, per-sample
    base = {k: v.detach().clone() for k, v in g.state_dict().items()}
    ema = load_dcgan(base_path, {"z_dim": 100, "ngf": 64}).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    d = Discriminator(sn=not args.no_sn)
    opt_g = torch.optim.Adam(g.parameters(), lr=args.lr_g, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(d.parameters(), lr=args.lr_d, betas=(0.0, 0.99))
    policy = set() if args.aug == "none" else set(args.aug.split(","))
    beta = 0.5 ** (1.0 / args.ema_half_life)

    step = 0
    if ck is not None:
        g.load_state_dict(ck["g"])
        ema.load_state_dict(ck["ema"])
        d.load_state_dict(ck["d"])
        opt_g.load_state_dict(ck["opt_g"])
        opt_d.load_state_dict(ck["opt_d"])
        for opt, lr in ((opt_g, args.lr_g), (opt_d, args.lr_d)):  # a learning rate given on resume takes effect
            for group in opt.param_groups:
                group["lr"] = lr
        step = int(ck["step"])
        set_rng_state(ck["rng"])
        print(f"resumed at step {step} (saved {ck.get('saved_at')}; args then {ck.get('args')})", flush=True)
    else:
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        random.seed(args.seed)
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))

    def checkpoint() -> None:
        atomic_save(
            {
                "g": g.state_dict(),
                "ema": ema.state_dict(),
                "d": d.state_dict(),
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "step": step,
                "rng": rng_state(),
                "args": vars(args),
                "saved_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
            out / "last.pt",
        )

    stop_at = None
    if args.stop_at:
        hh, mm = (int(v) for v in args.stop_at.split(":"))
        now = dt.datetime.now(dt.UTC)
        stop_at = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if stop_at <= now:
            stop_at += dt.timedelta(days=1)

    last_ckpt = time.time()
    t0, n0 = time.time(), step
    run = {"d_real": 0.0, "d_fake": 0.0, "g": 0.0, "r1": 0.0}
    while step < args.max_steps and (stop_at is None or dt.datetime.now(dt.UTC) < stop_at):
        idx = torch.randint(0, real.shape[0], (args.batch,))
        x_real = real[idx]
        flip = torch.rand(args.batch) < 0.5
        x_real = torch.where(flip[:, None, None, None], x_real.flip(3), x_real)

        # D step
        with torch.no_grad():
            x_fake = g(torch.randn(args.batch, 100))
        lr_real = d(augment(x_real, policy))
        lr_fake = d(augment(x_fake, policy))
        loss_d = F.softplus(-lr_real).mean() + F.softplus(lr_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        if args.r1 > 0 and step % args.r1_every == 0:
            xr = x_real[: args.batch // 2].detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(d(augment(xr, policy)).sum(), xr, create_graph=True)
            r1 = grad.pow(2).sum(dim=[1, 2, 3]).mean()
            opt_d.zero_grad(set_to_none=True)
            (0.5 * args.r1 * args.r1_every * r1).backward()
            opt_d.step()
            run["r1"] = 0.9 * run["r1"] + 0.1 * float(r1.detach())

        # G step
        for p in d.parameters():
            p.requires_grad_(False)
        x_gen = g(torch.randn(args.batch, 100))
        loss_g = F.softplus(-d(augment(x_gen, policy))).mean()
        if args.anchor > 0:
            params = dict(g.named_parameters())
            loss_g = loss_g + args.anchor * sum((params[k] - base[k]).pow(2).sum() for k in params)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        for p in d.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            for pe, pg in zip(ema.parameters(), g.parameters(), strict=True):
                pe.lerp_(pg, 1.0 - beta)
        step += 1

        run["d_real"] = 0.98 * run["d_real"] + 0.02 * float(lr_real.detach().mean())
        run["d_fake"] = 0.98 * run["d_fake"] + 0.02 * float(lr_fake.detach().mean())
        run["g"] = 0.98 * run["g"] + 0.02 * float(loss_g.detach())
        if step % 25 == 0:
            rate = (time.time() - t0) / max(1, step - n0)
            print(
                f"step {step} D(real) {run['d_real']:.3f} D(fake) {run['d_fake']:.3f} G {run['g']:.3f} "
                f"R1 {run['r1']:.3f} {rate:.2f}s/step {dt.datetime.now(dt.UTC):%H:%M:%S}",
                flush=True,
            )
        if step % args.snapshot_every == 0:
            atomic_save({"ema": ema.state_dict(), "step": step}, out / f"ema_{step:06d}.pt")
        if time.time() - last_ckpt >= args.ckpt_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    print(f"stopped at step {step}", flush=True)


if __name__ == "__main__":
    main()
