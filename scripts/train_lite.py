"""Train the embedded lite encoder/generator on the cached lfw-dev dlib-chips (TRAIN identities only).

Losses (per real image x, reconstruction y = G(E(x) with latent noise)):
- L1(y, x) + ``--ssim-weight`` * (1 - SSIM(y, x));
- ``--delta-weight`` * mean(delta^2) (e4e-style: per-layer offsets stay small);
- for half of the batch the per-layer deltas are dropped, so the base code alone (what key-derived codes are:
  one w repeated over all layers) must decode to the face;
- optional ``--adv-weight``: non-saturating GAN loss with R1, on reconstructions and on codes sampled from a
  running Gaussian fit of the encoder's codes (with random layer crossover), so sampled and mixed codes decode to
  plausible faces;
- optional ``--id-weight``: 1 - cos of the dlib recogniser (``worker.models.dlib_resnet``) between y and x on the
  first ``--id-batch`` images of each batch.

The LR warms up over 200 steps, then decays linearly over the last 20 % of the run; with ``--stop-at`` the
progress is the larger of step / steps and the elapsed share of the wall-clock budget (then the run is no longer
bit-reproducible). Every update's global gradient norm is clipped to ``--clip`` and an update with a non-finite
loss or gradient is skipped. Deterministic from ``--seed`` without ``--stop-at`` (data order and noise are
functions of seed and step); checkpoints atomically to ``runs/<name>/ckpt.pt`` every ``--ckpt-minutes`` and
resumes from it. Loss weights given on the command line override the checkpoint's (so a term can be switched on by
resuming); the LR is not stored (give the same ``--lr`` when resuming). At the end (``--steps`` reached or
``--stop-at`` wall clock) the EMA networks get the Gaussian mapping fitted and are written to the bundle.

``--finalize-only`` refits the mapping on the checkpoint and writes the bundle without training (``--out`` picks
the directory, e.g. a temporary one to inspect a checkpoint).

Run (as the committed bundle was trained, see tests/fixtures/bundles/lite/MODEL_CARD.md)::

    nohup setsid .venv/bin/python scripts/train_lite.py --steps 3000 --id-weight 1.0 --lr 1e-3 --stop-at 15:00 \
        >> runs/lite64.out 2>&1 &
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

from worker.evaluation.splits import identity_split  # noqa: E402
from worker.models.lite import (  # noqa: E402
    LiteEncoder,
    LiteGenerator,
    fit_gaussian_mapping,
    full_config,
    n_latent_for,
)

BUNDLE_DIR = ROOT / "tests" / "fixtures" / "bundles" / "lite"
DLIB_RESNET_PATH = "pkg://face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"


# ----------------------------------------------------------------------------------------------------------------
def load_chips(cache: Path, size: int) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """-> (uint8 (N, R, R, 3), rows (identity, relpath, split))."""
    arr = np.load(cache / f"lfw_chips_{size}.npy")
    rows = []
    for line in (cache / f"lfw_chips_{size}.tsv").read_text().splitlines():
        _, name, rel, _ = line.split("\t")
        rows.append((name, rel, identity_split(name)))  # recomputed: the rule lives in worker/evaluation/splits.py
    assert len(rows) == len(arr)
    return arr, rows


def to_tensor(chips: np.ndarray) -> torch.Tensor:
    """uint8 (B, R, R, 3) -> float (B, 3, R, R) in [-1, 1]."""
    return torch.from_numpy(chips).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _gauss_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None].repeat(3, 1, 1, 1)


def ssim(a: torch.Tensor, b: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of images in [-1, 1], (B, 3, H, W) each."""
    a, b = (a + 1) / 2, (b + 1) / 2
    pad = win.shape[-1] // 2

    def f(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, [pad] * 4, mode="reflect"), win, groups=3)

    mu_a, mu_b = f(a), f(b)
    saa = f(a * a) - mu_a**2
    sbb = f(b * b) - mu_b**2
    sab = f(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.mean()


class Discriminator(nn.Module):
    """images (B, 3, R, R) -> logits (B,). Residual conv trunk with a minibatch-stddev feature."""

    def __init__(self, resolution: int, channels: list[int]):
        super().__init__()
        from worker.models.lite import _ResDown

        log = int(math.log2(resolution))
        ch = channels[: log - 1]
        self.from_rgb = nn.Conv2d(3, ch[0], 3, padding=1)
        self.blocks = nn.Sequential(*[_ResDown(ch[i], ch[i + 1], light=i < 2) for i in range(len(ch) - 1)])
        self.conv = nn.Conv2d(ch[-1] + 1, ch[-1], 3, padding=1)
        self.fc = nn.Linear(ch[-1] * 16, ch[-1])
        self.out = nn.Linear(ch[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.leaky_relu(self.from_rgb(x), 0.2))
        group = min(4, h.shape[0])
        while h.shape[0] % group:
            group -= 1
        s = h.view(group, -1, *h.shape[1:]).std(0).mean(dim=(1, 2, 3))  # (B/group,)
        s = s.repeat(group)[:, None, None, None].expand(-1, 1, 4, 4)
        h = F.leaky_relu(self.conv(torch.cat([h, s], 1)), 0.2)
        return self.out(F.leaky_relu(self.fc(h.flatten(1)), 0.2)).squeeze(1)


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1.0 - decay)
        for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
            be.copy_(bm)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
def finalize(state: dict, cfg: dict, chips: np.ndarray, train_idx: np.ndarray, out_dir: Path, args, log) -> None:
    """Fit the Gaussian mapping on EMA encoder codes of the TRAIN images, take the recognizer's mean direction over
    them (the engine's ``key_target_center``) and write weights + manifest."""
    g = LiteGenerator(cfg)
    e = LiteEncoder(cfg)
    g.load_state_dict(state["g_ema"])
    e.load_state_dict(state["e_ema"])
    g.eval()
    e.eval()
    from worker.models.dlib_resnet import load_dlib_resnet

    ident = load_dlib_resnet()
    if e.identity_dim:
        e.attach_identity(ident)
    codes, emb_sum = [], torch.zeros(128, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(train_idx), 256):
            x = to_tensor(chips[train_idx[i : i + 256]])
            feats = ident.embed(x, "dlib-chip")  # (B, 128), L2-normalised
            emb_sum += feats.double().sum(0)
            c, _ = e.encode_parts(x, feats * math.sqrt(e.identity_dim) if e.identity_dim else None)
            codes.append(c)
    # the engine rotates key targets about the recognizer's mean direction (docs/decisions.md)
    center = torch.nn.functional.normalize(emb_sum, dim=0)
    codes_t = torch.cat(codes)
    fit_gaussian_mapping(g, e, codes_t)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"lite_{cfg['resolution']}.pt"
    payload = {
        "generator": {
            k: v.half() if v.is_floating_point() and k != "map_chol" and k != "w_avg" else v
            for k, v in g.state_dict().items()
        },
        "encoder": {k: v.half() if v.is_floating_point() and k != "w_avg" else v for k, v in e.state_dict().items()},
    }
    # fp16 storage halves the file; map_chol and w_avg stay fp32 (tiny, and they set the key-derived codes)
    atomic_save(payload, weights)
    digest = sha256_file(weights)
    comp_cfg = {
        k: cfg[k] for k in ("resolution", "w_dim", "z_dim", "g_channels", "e_channels", "e_hidden", "e_identity")
    }
    manifest = {
        "bundle_id": f"lite-{cfg['resolution']}-{digest[:12]}",
        "schema_version": 1,
        "components": {
            "generator": {"format": "lite-generator", "path": weights.name, "sha256": digest, "config": comp_cfg},
            "encoder": {"format": "lite-encoder", "path": weights.name, "sha256": digest, "config": comp_cfg},
            "identity": {
                "format": "dlib-resnet",
                "path": DLIB_RESNET_PATH,
                "sha256": dlib_resnet_sha256(),
                "config": {"embedding_dim": 128, "input_size": 150},
            },
        },
    }
    old_path = out_dir / "manifest.json"
    old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    if old.get("bundle_id") == manifest["bundle_id"]:
        # same weights finalised again: keep what was measured on them (threshold, calibration record)
        manifest.update({k: v for k, v in old.items() if k not in manifest})
    manifest["engine"] = {
        **(manifest.get("engine") or {}),
        "key_target_center": [round(float(v), 7) for v in center],
    }
    old_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log(
        f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB, sha256 {digest[:16]}...) and manifest.json; "
        f"Gaussian fitted on {len(codes_t)} train codes"
    )


def init_from_bundle_weights(G: nn.Module, E: nn.Module, path: Path) -> None:
    """Copy a finalised lite weights file into fresh networks. Every tensor of the file must fit; the only new
    tensors allowed are the encoder's identity projection (zero-initialised below, so the start reproduces the old
    model exactly)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    G.load_state_dict({k: v.float() for k, v in ckpt["generator"].items()}, strict=True)
    missing, unexpected = E.load_state_dict({k: v.float() for k, v in ckpt["encoder"].items()}, strict=False)
    if unexpected or any(not k.startswith("id_proj.") for k in missing):
        raise SystemExit(f"--init-from {path}: layout mismatch (missing {missing}, unexpected {unexpected})")
    if E.id_proj is not None:
        nn.init.zeros_(E.id_proj.weight)
        nn.init.zeros_(E.id_proj.bias)


def dlib_resnet_sha256() -> str:
    import face_recognition_models

    return sha256_file(Path(face_recognition_models.face_recognition_model_location()))


# ----------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="lite64")
    ap.add_argument("--cache", type=Path, default=ROOT / "data-cache")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--out", type=Path, default=BUNDLE_DIR)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy shared CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ckpt-minutes", type=float, default=4.0)
    ap.add_argument("--stop-at", default="", help="HH:MM (local time): stop, checkpoint and finalize then")
    ap.add_argument("--finalize-only", action="store_true")
    ap.add_argument(
        "--identity-cond", action="store_true", help="encoder also reads the frozen dlib descriptor (e_identity=128)"
    )
    ap.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start (not resume) from the weights of a finalised lite bundle file (e.g. an earlier lite_64.pt); layers "
        "it lacks (such as the encoder's identity input) start at their initial values",
    )
    ap.add_argument("--g-channels", default="", help="comma-separated generator channels per resolution 4..R")
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--clip", type=float, default=1.0, help="max global gradient norm per optimizer step; 0 = off")
    # loss weights (None = checkpoint's value or the default)
    ap.add_argument("--ssim-weight", type=float, default=None)
    ap.add_argument("--delta-weight", type=float, default=None)
    ap.add_argument("--noise", type=float, default=None, help="latent noise, fraction of the per-dim code std")
    ap.add_argument("--adv-weight", type=float, default=None)
    ap.add_argument("--adv-start", type=int, default=None)
    ap.add_argument("--r1", type=float, default=None)
    ap.add_argument("--id-weight", type=float, default=None)
    ap.add_argument("--id-batch", type=int, default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run_dir = args.runs / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "ckpt.pt"
    log_file = open(run_dir / "train.log", "a")

    def log(msg: str) -> None:
        line = f"[{dt.datetime.now().strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    defaults = {
        "ssim_weight": 0.5,
        "delta_weight": 1.0,
        "noise": 0.1,
        "adv_weight": 0.05,
        "adv_start": 800,
        "r1": 1.0,
        "id_weight": 0.0,
        "id_batch": 8,
    }
    chips, rows = load_chips(args.cache, args.resolution)
    train_idx = np.array([i for i, r in enumerate(rows) if r[2] == "train"])
    n_val_ids = len({r[0] for r in rows if r[2] != "train"})
    overrides: dict = {"resolution": args.resolution}
    if args.identity_cond:
        overrides["e_identity"] = 128
    if args.g_channels:
        overrides["g_channels"] = [int(c) for c in args.g_channels.split(",")]
    cfg = full_config(overrides)
    if ckpt_path.exists():  # a resumed run keeps the architecture it started with
        cfg = full_config(torch.load(ckpt_path, map_location="cpu", weights_only=False)["config"])

    torch.manual_seed(args.seed)
    G, E = LiteGenerator(cfg).to(device), LiteEncoder(cfg).to(device)
    D = Discriminator(args.resolution, cfg["e_channels"]).to(device)
    if args.init_from and not ckpt_path.exists():
        init_from_bundle_weights(G, E, args.init_from)
    G_ema, E_ema = copy.deepcopy(G).eval(), copy.deepcopy(E).eval()
    opt_ge = torch.optim.Adam(list(G.parameters()) + list(E.parameters()), lr=args.lr, betas=(0.5, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.99))
    w_dim = cfg["w_dim"]
    code_mean = torch.zeros(w_dim, device=device)
    code_cov = torch.eye(w_dim, device=device)
    step, elapsed_prev, weights = 0, 0.0, dict(defaults)
    if ckpt_path.exists():
        st = torch.load(ckpt_path, map_location=device, weights_only=False)
        G.load_state_dict(st["g"])
        E.load_state_dict(st["e"])
        D.load_state_dict(st["d"])
        G_ema.load_state_dict(st["g_ema"])
        E_ema.load_state_dict(st["e_ema"])
        opt_ge.load_state_dict(st["opt_ge"])
        opt_d.load_state_dict(st["opt_d"])
        code_mean, code_cov = st["code_mean"].to(device), st["code_cov"].to(device)
        step, elapsed_prev = st["step"], st["elapsed"]
        st_wall_start = st.get("wall_start", time.time())
        weights.update(st["weights"])
        log(f"resumed from {ckpt_path} at step {step} ({elapsed_prev / 60:.1f} min trained)")
    for k in defaults:
        v = getattr(args, k)
        if v is not None:
            weights[k] = type(defaults[k])(v)
    log(
        f"config {cfg}; weights {weights}; {len(train_idx)} train images, "
        f"{len(rows) - len(train_idx)} val/holdout images "
        f"({n_val_ids} val + holdout identities excluded); device {device}, threads {args.threads}"
    )
    log(
        f"params: G {sum(p.numel() for p in G.parameters())}, E {sum(p.numel() for p in E.parameters())}, "
        f"D {sum(p.numel() for p in D.parameters())}"
    )

    def snapshot() -> dict:
        return {
            "g": G.state_dict(),
            "e": E.state_dict(),
            "d": D.state_dict(),
            "g_ema": G_ema.state_dict(),
            "e_ema": E_ema.state_dict(),
            "opt_ge": opt_ge.state_dict(),
            "opt_d": opt_d.state_dict(),
            "code_mean": code_mean,
            "code_cov": code_cov,
            "step": step,
            "elapsed": elapsed_prev + (time.time() - t_start),
            "weights": weights,
            "config": cfg,
            "seed": args.seed,
            "wall_start": wall_start,
        }

    if args.finalize_only:
        t_start = wall_start = time.time()
        finalize(
            snapshot() if not ckpt_path.exists() else torch.load(ckpt_path, map_location="cpu", weights_only=False),
            cfg,
            chips,
            train_idx,
            args.out,
            args,
            log,
        )
        return

    id_model = None
    if weights["id_weight"] > 0 or E.identity_dim:
        from worker.models.dlib_resnet import load_dlib_resnet

        id_model = load_dlib_resnet().to(device).eval()
        for p in id_model.parameters():
            p.requires_grad_(False)
        log("dlib resnet loaded (identity loss and/or encoder input)")
        if E.identity_dim:
            E.attach_identity(id_model)
            E_ema.attach_identity(id_model)

    stop_at = None
    if args.stop_at:
        hh, mm = map(int, args.stop_at.split(":"))
        now = dt.datetime.now()
        stop_at = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if stop_at < now:
            stop_at += dt.timedelta(days=1)
    wall_start = st_wall_start if ckpt_path.exists() else time.time()
    win = _gauss_window().to(device)
    n_lat = n_latent_for(args.resolution)
    per_epoch = len(train_idx) // args.batch
    ge_params = list(G.parameters()) + list(E.parameters())
    skipped = [0]

    def step_ok(loss_value: torch.Tensor, params: list, what: str) -> bool:
        """Clip the global gradient norm; False (skip this update) when the loss or the gradient is not finite.

        A gradient spike threw an earlier run off at lr 2e-3. With Adam, clipping to a fixed norm only rescales
        gradients it normalises anyway; what it changes is that one huge gradient no longer dominates the moments.
        """
        ok = bool(torch.isfinite(loss_value))
        if args.clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, args.clip)
            ok = ok and bool(torch.isfinite(gn))
            run_stats[f"gn_{what}"] = run_stats.get(f"gn_{what}", 0.0) + (float(gn) if ok else 0.0)
        if not ok:
            skipped[0] += 1
            log(f"step {step}: non-finite {what} loss or gradient, update skipped ({skipped[0]} so far)")
        return ok

    t_start = time.time()
    t_ckpt = time.time()
    t_log, imgs_log = time.time(), 0
    run_stats: dict[str, float] = {}
    while step < args.steps:
        if stop_at is not None and dt.datetime.now() >= stop_at:
            log(f"stop-at {args.stop_at} reached at step {step}")
            break
        epoch, pos = divmod(step, per_epoch)
        perm = np.random.default_rng(args.seed * 1000 + epoch).permutation(len(train_idx))
        idx = train_idx[perm[pos * args.batch : (pos + 1) * args.batch]]
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        x = to_tensor(chips[np.sort(idx)])
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x).to(device)
        progress = step / args.steps
        if stop_at is not None:  # wall-clock schedule: the LR decay must happen before the deadline
            progress = max(progress, (time.time() - wall_start) / max(1.0, stop_at.timestamp() - wall_start))
        lr_scale = min(1.0, (step + 1) / 200) * (1.0 if progress < 0.8 else max(0.05, (1 - progress) / 0.2))
        for opt in (opt_ge, opt_d):
            for grp in opt.param_groups:
                grp["lr"] = args.lr * lr_scale
        adv_on = weights["adv_weight"] > 0 and step >= weights["adv_start"]
        B = len(x)

        # ---- generator + encoder step
        ex_all = None
        if E.identity_dim:  # one recognizer pass serves as encoder input and identity-loss target
            ex_all = E.identity_features(x)
        code, delta = E.encode_parts(x, ex_all)
        std = code.detach().std(0, keepdim=True)
        noise = torch.randn(code.shape, generator=gen).to(device) * std * weights["noise"]
        keep = (torch.arange(B) % 2 == 0).to(device)[:, None, None].float()  # odd rows: base code only
        wplus = (code + noise)[:, None, :] + delta * keep
        y = G.synthesis(wplus, clamp=False)
        l1 = (y - x).abs().mean()
        l_ssim = 1 - ssim(y, x, win)
        l_delta = delta[:, 1:].pow(2).mean()
        loss = l1 + weights["ssim_weight"] * l_ssim + weights["delta_weight"] * l_delta
        stats = {"l1": l1.item(), "ssim": 1 - l_ssim.item(), "delta": l_delta.item()}
        if id_model is not None and weights["id_weight"] > 0:
            nb = min(weights["id_batch"], B)
            with torch.no_grad():
                ex = ex_all[:nb] / math.sqrt(E.identity_dim) if ex_all is not None else id_model.embed(x[:nb])
            ey = id_model.embed(y[:nb].clamp(-1, 1), "dlib-chip")
            l_id = (1 - (ex * ey).sum(1)).mean()
            loss = loss + weights["id_weight"] * l_id
            stats["id"] = l_id.item()
        if adv_on:
            nr = B // 2
            L = torch.linalg.cholesky(code_cov + 1e-4 * code_cov.diagonal().mean() * torch.eye(w_dim, device=device))
            zr = torch.randn(2 * nr, w_dim, generator=gen).to(device)
            wr = code_mean + zr @ L.t()
            wr_plus = wr[:nr, None, :].repeat(1, n_lat, 1)
            cross = torch.randint(1, n_lat, (nr,), generator=gen).to(device)
            mix = (torch.arange(n_lat, device=device)[None, :] >= cross[:, None])[..., None]
            mix = mix & (torch.rand(nr, generator=gen) < 0.5).to(device)[:, None, None]
            wr_plus = torch.where(mix, wr[nr:, None, :].expand(-1, n_lat, -1), wr_plus)
            yr = G.synthesis(wr_plus, clamp=False)
            fake = torch.cat([y, yr])
            l_adv = F.softplus(-D(fake)).mean()
            loss = loss + weights["adv_weight"] * l_adv
            stats["g_adv"] = l_adv.item()
        opt_ge.zero_grad(set_to_none=True)
        loss.backward()
        if step_ok(loss, ge_params, "ge"):
            opt_ge.step()

        # ---- discriminator step
        if adv_on or (weights["adv_weight"] > 0 and step >= weights["adv_start"] - 200):
            if not adv_on:  # warm the discriminator up on reconstructions before G sees it
                fake = y
            d_fake = D(fake.detach())
            xr = x.detach().requires_grad_(step % 4 == 0)
            d_real = D(xr)
            l_d = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
            if step % 4 == 0:
                (grad,) = torch.autograd.grad(d_real.sum(), xr, create_graph=True)
                l_d = l_d + weights["r1"] * 4 * 0.5 * grad.pow(2).sum(dim=(1, 2, 3)).mean()
            opt_d.zero_grad(set_to_none=True)
            l_d.backward()
            if step_ok(l_d, list(D.parameters()), "d"):
                opt_d.step()
            stats["d"] = l_d.item()

        with torch.no_grad():
            c = code.detach()
            code_mean.lerp_(c.mean(0), 0.01)
            cc = c - code_mean
            code_cov.lerp_(cc.t() @ cc / max(1, B - 1), 0.01)
        ema_update(G_ema, G, args.ema if step > 500 else 0.9)
        ema_update(E_ema, E, args.ema if step > 500 else 0.9)
        step += 1
        imgs_log += B
        for k, v in stats.items():
            run_stats[k] = run_stats.get(k, 0.0) + v
        if step % 25 == 0:
            dt_log = time.time() - t_log
            ips = imgs_log / dt_log
            eta = (args.steps - step) * B / ips
            msg = " ".join(f"{k} {v / 25:.4f}" for k, v in run_stats.items())
            log(
                f"step {step}/{args.steps} ep {step / per_epoch:.2f} {msg} lr {args.lr * lr_scale:.2e} "
                f"{ips:.1f} img/s ETA {eta / 60:.1f} min"
            )
            t_log, imgs_log, run_stats = time.time(), 0, {}
        if time.time() - t_ckpt > args.ckpt_minutes * 60:
            atomic_save(snapshot(), ckpt_path)
            t_ckpt = time.time()
            log(f"checkpoint at step {step}")
    st = snapshot()
    atomic_save(st, ckpt_path)
    log(f"training done at step {step}, {st['elapsed'] / 60:.1f} min of training")
    finalize(st, cfg, chips, train_idx, args.out, args, log)


if __name__ == "__main__":
    main()
