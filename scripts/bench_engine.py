"""Benchmark (not a test) of the engine's optimisation loop, and a small quality check of its settings.

speed (default)
    images/s of Engine calls (encode + optimise + decode + template) at batch 1, 4, 16 with the same step count,
    against a loop written the reference's way (one image at a time, a new optimizer per image, the ORIGINAL's
    identity features recomputed at every step); plus the wall time to anonymise one face with 50 steps; plus the
    engine against its compute floor: at batch ``--floor-batch`` (8, the deployment's) and the deployed 50 steps, the
    engine call's CPU seconds per image-step (encode, key latents, optimise, decode, templates) against one step's
    unavoidable work alone (generator synthesis and identity model, plus the attribute model when the bundle has one,
    forward and backward to the trainable latents; no loss terms, optimiser or schedule). Target: <= 1.10x.
    Uses the lite bundle (tests/fixtures/bundles/lite) when present, else a randomly initialised lite-sized generator
    and encoder with the real dlib ResNet identity model (labelled as such: same cost, meaningless faces).

quality
    On a few lfw-dev identities (needs ../shared, a trained bundle and the independent evaluator): for each split
    preset and with/without the key target, enrol 2 images per identity in one run and probe a third image
    alone later, under key A; re-enrol under key B. Scores by the INDEPENDENT evaluator (YuNet + MobileFaceNet):
    enrol-then-probe genuine vs impostor (TAR at FAR 1 %, EER), protection (cancelable vs original of the same
    person, share below the original-vs-original threshold at FAR 1 %), unlinkability D_sys (key A vs key B).

speed on CUDA (``--device cuda``, or ``CANCELABLE_ENGINE__DEVICE=cuda`` / ``cuda:N`` when ``--device`` is not given)
    images/s of Engine calls at batch 1, 8, 32 (``--gpu-batches``), each with mixed precision off and on (bf16
    autocast in the optimisation loop, ``EngineConfig.mixed_precision``): best wall time of ``--repeats`` calls,
    CUDA synchronised before and after, after a warm-up call per setting; plus peak GPU memory. Where CUDA is not
    available it prints why and measures nothing (exit 0, so ``make bench`` goes on). ``--dry-run`` runs the same
    code on the CPU with batches 1 and 2 and one step (mixed precision is CUDA-only, so both rows run in fp32): it
    checks the path, its figures mean nothing.

Run: .venv/bin/python scripts/bench_engine.py speed [--steps 10] [--threads 1] [--device cpu|cuda|cuda:N]
     .venv/bin/python scripts/bench_engine.py speed --device cuda [--gpu-batches 1 8 32] [--dry-run]
     .venv/bin/python scripts/bench_engine.py quality [--bundle tests/fixtures/bundles/lite] [--ids 12]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from worker.algorithm.config import EngineConfig  # noqa: E402
from worker.algorithm.keylatent import key_latent, key_latents  # noqa: E402
from worker.algorithm.losses import anon_loss, attr_loss  # noqa: E402
from worker.algorithm.mix import assemble, mix  # noqa: E402
from worker.algorithm.pipeline import Engine  # noqa: E402

LITE_DIR = ROOT / "tests" / "fixtures" / "bundles" / "lite"
SHARED = Path(os.environ.get("CANCELABLE_SHARED_DIR", ROOT.parent / "shared"))


# --- models -----------------------------------------------------------------------------------------------------------
def load_models(bundle_dir: Path, device: torch.device) -> tuple[Any, str]:
    """The lite bundle if present, else a random lite-sized stand-in. -> (bundle-like, label)."""
    if (bundle_dir / "manifest.json").is_file():
        from worker.models.bundle import load_bundle

        bundle = load_bundle(bundle_dir, device)
        return bundle, f"bundle {bundle.bundle_id}"
    from types import SimpleNamespace

    from worker.models.dlib_resnet import load_dlib_resnet
    from worker.models.lite import LiteEncoder, LiteGenerator

    torch.manual_seed(0)
    gen, enc = LiteGenerator(), LiteEncoder()
    bundle = SimpleNamespace(generator=gen, encoder=enc, identity=load_dlib_resnet(), attribute=None, bundle_id="x")
    return bundle, "RANDOMLY INITIALISED lite-sized generator/encoder (64 px, no trained bundle found) + dlib ResNet"


def random_faces(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, size // 8, size // 8, generator=g)
    return torch.tanh(F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False))


# --- the reference's way of working (for the speed-up only) -----------------------------------------------------------
def reference_style(engine: Engine, faces: torch.Tensor, seeds: list[bytes]) -> list[torch.Tensor]:
    """One image at a time, a fresh torch Adam + MultiStepLR per image, original's features recomputed per step."""
    gen, enc, ident, cfg = engine.generator, engine.encoder, engine.identity, engine.config
    galign, ealign = gen.alignment, enc.alignment
    outs = []
    for face, seed in zip(faces, seeds, strict=True):
        x_r = face[None].to(engine.device)
        with torch.no_grad():
            w_real = enc(x_r).float()
        w_key = key_latent(gen, seed, cfg.truncation_psi)[None]
        w_mixed, w_train = mix(w_real, w_key, engine.split)
        w_train = w_train.clone().requires_grad_(True)
        opt = torch.optim.Adam([w_train], lr=cfg.lr)
        steps = cfg.steps
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(m * steps) for m in cfg.lr_milestones], cfg.lr_decay)
        for _ in range(steps):
            opt.zero_grad()
            img = gen.synthesis(assemble(w_mixed, w_train, engine.split))
            e_p = ident.embed(img, galign)
            e_r = ident.embed(x_r, ealign)  # recomputed every step, as the reference does
            loss = cfg.w_anon * anon_loss(e_p, e_r).mean()
            if engine.attribute is not None:
                loss = (
                    loss
                    + cfg.w_attr
                    * attr_loss(engine.attribute.tokens(img, galign), engine.attribute.tokens(x_r, ealign)).mean()
                )
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            outs.append(gen.synthesis(assemble(w_mixed, w_train.detach(), engine.split)).cpu())
    return outs


def floor_step(engine: Engine, faces: torch.Tensor, seeds: list[bytes]) -> Any:
    """One optimisation step's unavoidable work for ``faces`` (B, 3, R, R), one subject each: generator synthesis of
    the mixed latents, identity embedding (and attribute tokens) of the result, backward to the trainable latents."""
    gen, split = engine.generator, engine.split
    with torch.no_grad():
        w_real = engine.encoder(faces.to(engine.device)).float()
    w_key = key_latents(gen, seeds, engine.config.truncation_psi).to(w_real.dtype)
    w_mixed, w_train = mix(w_real, w_key, split)
    w_train = w_train.detach().clone().requires_grad_(True)

    def step() -> None:
        img = gen.synthesis(assemble(w_mixed, w_train, split))
        out = engine.identity.embed(img, gen.alignment).sum()
        if engine.attribute is not None:
            out = out + engine.attribute.tokens(img, gen.alignment).sum()
        out.backward()
        w_train.grad = None

    return step


def compute_floor(bundle: Any, device: torch.device, batch: int, repeats: int) -> None:
    steps = 50
    engine = Engine(bundle, EngineConfig(steps=steps, max_batch_images=64), device)
    r = engine.input_size
    seeds = [bytes([i % 256, 7]) * 16 for i in range(batch)]
    faces = random_faces(batch, r, 11)
    subjects = [(f[None], seeds[i]) for i, f in enumerate(faces)]
    step = floor_step(engine, faces, seeds)
    step()  # warm-up
    floor_steps = 10
    eng_cpu, floor_cpu = [], []
    for _ in range(repeats):  # interleaved, best CPU time of each (1 thread: CPU time = time on an idle core)
        c = time.process_time()
        engine(subjects)
        eng_cpu.append(time.process_time() - c)
        c = time.process_time()
        for _ in range(floor_steps):
            step()
        floor_cpu.append(time.process_time() - c)
    per_eng = min(eng_cpu) / (batch * steps) * 1000.0
    per_floor = min(floor_cpu) / (batch * floor_steps) * 1000.0
    print(
        f"compute floor, batch {batch}: {per_floor:.2f} ms CPU per image-step (generator + identity"
        f"{' + attribute' if engine.attribute is not None else ''} model, forward and backward, nothing else)"
    )
    print(
        f"engine, batch {batch}, {steps} steps (encode, key latents, optimise, decode, templates): {per_eng:.2f} ms "
        f"CPU per image-step = {per_eng / per_floor:.2f}x the compute floor (target <= 1.10x)"
    )


def cmd_speed(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle, label = load_models(Path(args.bundle), device)
    cfg = EngineConfig(steps=args.steps, max_batch_images=64)
    engine = Engine(bundle, cfg, device)
    r = engine.input_size
    print(f"models: {label}; device {device}; torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.2f}")
    print(f"split: {engine.split.describe()}; steps {args.steps}")
    seeds = [bytes([i % 256, i // 256]) * 16 for i in range(64)]
    engine([(random_faces(1, r, 99), seeds[0])])  # warm-up
    reference_style(engine, random_faces(1, r, 98), seeds[:1])  # warm-up
    runs: dict[str, tuple[int, Any]] = {}
    for b in args.batches:
        subjects = [(f[None], seeds[i]) for i, f in enumerate(random_faces(b, r, b))]
        runs[f"batched engine, batch {b:2d} ({b} subjects)"] = (b, lambda s=subjects: engine(s))
    n_ref = args.ref_images
    ref_faces = random_faces(n_ref, r, 7)
    ref_name = f"reference-style loop, {n_ref} image(s) one at a time"
    runs[ref_name] = (n_ref, lambda: reference_style(engine, ref_faces, seeds[:n_ref]))
    # Interleaved rounds. The machine is shared, so wall time is noisy: the images/s quoted use the best process
    # CPU time (one torch thread: CPU time = the time on an idle core); best wall time is printed beside it.
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (_, fn) in runs.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    rates = {}
    for name, (n, _) in runs.items():
        rates[name] = n / min(cpu[name])
        print(
            f"{name:48s} cpu {min(cpu[name]):7.2f} s  wall {min(wall[name]):7.2f} s  {rates[name]:7.2f} images/s"
            f"  ({n / min(cpu[name]) * args.steps:.1f} image-steps/s)"
        )
    for name in runs:
        if name != ref_name:
            print(f"speed-up over the reference-style loop, {name}: x{rates[name] / rates[ref_name]:.2f}")
    one = Engine(bundle, EngineConfig(steps=50), device)
    face = random_faces(1, r, 3)[0]
    times, ctimes = [], []
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        one.probe(face, seeds[1])
        times.append(time.perf_counter() - t)
        ctimes.append(time.process_time() - c)
    print(f"one face, 50 steps, engine.probe: cpu {min(ctimes):.2f} s, wall best {min(times):.2f} s")
    compute_floor(bundle, device, args.floor_batch, args.repeats)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


# --- speed on CUDA ---------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_rates(
    bundle: Any, device: torch.device, batches: list[int], mixed: list[bool], steps: int, repeats: int
) -> list[dict[str, Any]]:
    """images/s of ``Engine`` calls (one subject of one image per batch slot) for each mixed-precision setting and
    batch size: best wall time of ``repeats`` calls after a warm-up call, the device synchronised around each."""
    rows = []
    seeds = [bytes([i % 256, i // 256]) * 16 for i in range(max(batches))]
    for mp in mixed:
        cfg = EngineConfig(steps=steps, max_batch_images=max(batches), mixed_precision=mp)
        engine = Engine(bundle, cfg, device)
        r = engine.input_size
        engine([(random_faces(1, r, 99), seeds[0])])  # warm-up: kernels, cuDNN/cuBLAS autotuning, allocator
        for b in batches:
            subjects = [(f[None], seeds[i]) for i, f in enumerate(random_faces(b, r, b))]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            best = float("inf")
            for _ in range(repeats):
                _sync(device)
                t = time.perf_counter()
                out = engine(subjects)
                _sync(device)
                best = min(best, time.perf_counter() - t)
            assert len(out) == b
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            rows.append({"mixed_precision": mp, "batch": b, "seconds": best, "images_per_s": b / best, "peak_mb": peak})
    return rows


def cuda_unavailable_reason(device: torch.device) -> str | None:
    """Why ``device`` (a CUDA device) cannot be benchmarked here, or None when it can."""
    if not torch.cuda.is_available():
        return f"torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"{device} requested but only {torch.cuda.device_count()} CUDA device(s) visible"
    return None


def cmd_cuda(args: argparse.Namespace, device: torch.device) -> None:
    torch.set_num_threads(args.threads)
    if args.dry_run:
        device, batches, steps, repeats = torch.device("cpu"), [1, 2], 1, 1
        print(
            f"DRY RUN on the CPU (the {args.device} path's code, batches {batches}, {steps} step): figures mean nothing"
        )
    else:
        reason = cuda_unavailable_reason(device)
        if reason is not None:
            print(f"CUDA engine benchmark SKIPPED: engine device {device} but {reason}; nothing measured")
            return
        batches, steps, repeats = args.gpu_batches, args.steps, args.repeats
    bundle, label = load_models(Path(args.bundle), device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"models: {label}; device {device} ({name}); torch {torch.__version__}; steps {steps}; best of {repeats}")
    for row in device_rates(bundle, device, batches, [False, True], steps, repeats):
        on = "on (bf16 autocast)" if device.type == "cuda" else "on (CUDA-only: fp32)"
        mp = on if row["mixed_precision"] else "off (fp32)"
        mem = "" if row["peak_mb"] is None else f", peak GPU memory {row['peak_mb']:.0f} MiB"
        print(
            f"mixed precision {mp:<20} batch {row['batch']:2d}: {row['images_per_s']:8.2f} images/s "
            f"({row['seconds']:.3f} s per call, {row['images_per_s'] * steps:.0f} image-steps/s{mem})"
        )


def resolve_device(flag: str | None) -> torch.device:
    """``--device``, else the deployment's ``engine.device`` (``CANCELABLE_ENGINE__DEVICE``; ``auto`` = CUDA when
    available), else the CPU."""
    if flag is not None:
        return torch.device(flag)
    from worker.service.engine import pick_device
    from worker.settings import EngineSettings

    spec = os.environ.get("CANCELABLE_ENGINE__DEVICE", "cpu")
    return pick_device(EngineSettings(device=spec).device)


# --- quality ----------------------------------------------------------------------------------------------------------
def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def cmd_quality(args: argparse.Namespace) -> None:
    from PIL import Image

    from worker.evaluation import scores as metrics
    from worker.evaluation.evaluator import Evaluator

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle, label = load_models(Path(args.bundle), device)
    print(f"models: {label}")
    evaluator = Evaluator()
    lfw = SHARED / "data" / "lfw-dev"
    people = sorted(p for p in lfw.iterdir() if len(list(p.glob("*.jpg"))) >= 3)
    random.Random(0).shuffle(people)
    prep = Engine(bundle, EngineConfig(), device)
    subjects: list[tuple[str, torch.Tensor, np.ndarray]] = []  # name, faces (3, 3, R, R), originals (3, 128)
    for person in people:
        if len(subjects) >= args.ids:
            break
        try:
            paths = sorted(person.glob("*.jpg"))[:3]
            rgbs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
            faces = torch.stack([prep.prepare(x) for x in rgbs])
        except Exception:  # a face dlib cannot find is skipped here
            continue
        emb = [evaluator.embed(_to_uint8(f)) for f in faces]  # originals judged on the same crops
        if any(e is None for e in emb):
            continue
        subjects.append((person.name, faces, np.stack(emb)))  # type: ignore[arg-type]
    n = len(subjects)
    print(f"{n} identities x 3 images (2 enrolled together, 1 probed alone later)")
    orig = np.stack([s[2] for s in subjects])  # (n, 3, 128)
    gen_o = [float(orig[i, 0] @ orig[i, 2]) for i in range(n)]
    imp_o = [float(orig[i, 0] @ orig[j, 2]) for i in range(n) for j in range(n) if i != j]
    thr = metrics.threshold_at_far(np.array(imp_o), 0.01)
    print(f"originals: genuine mean {np.mean(gen_o):.3f}, impostor mean {np.mean(imp_o):.3f}, thr@FAR1% {thr:.3f}")
    for split in args.splits:
        for key_target in (False, True):
            cfg = EngineConfig(split=split, key_target=key_target, w_key=args.w_key, steps=args.steps)
            engine = Engine(bundle, cfg, device)
            t = time.perf_counter()
            row = _quality_row(engine, evaluator, subjects, orig, thr, metrics)
            print(f"split={split:6s} key_target={key_target!s:5s} {row}  ({time.perf_counter() - t:.0f} s)")


def _judge(evaluator: Any, images: torch.Tensor) -> np.ndarray:
    out = []
    for img in images:
        e = evaluator.embed(_to_uint8(img))
        out.append(np.full(128, np.nan, dtype=np.float32) if e is None else e)
    return np.stack(out)


def _quality_row(engine: Engine, evaluator: Any, subjects: list, orig: np.ndarray, thr: float, metrics: Any) -> str:
    key_a = [bytes([1, i]) * 16 for i in range(len(subjects))]
    key_b = [bytes([2, i]) * 16 for i in range(len(subjects))]
    enrolled = engine.enroll_many([(s[1][:2], k) for s, k in zip(subjects, key_a, strict=True)])
    probes = [engine.probe(s[1][2], k) for s, k in zip(subjects, key_a, strict=True)]
    other = engine.enroll_many([(s[1][:2], k) for s, k in zip(subjects, key_b, strict=True)])
    n = len(subjects)
    templ = [_norm(np.nanmean(_judge(evaluator, r.images), 0)) for r in enrolled]
    probe_e = _judge(evaluator, torch.stack([p.image for p in probes]))
    other_t = [_norm(np.nanmean(_judge(evaluator, r.images), 0)) for r in other]
    fta = int(np.isnan(probe_e[:, 0]).sum())
    genuine = np.array([float(templ[i] @ probe_e[i]) for i in range(n)])
    impostor = np.array([float(templ[i] @ probe_e[j]) for i in range(n) for j in range(n) if i != j])
    ok = ~np.isnan(genuine)
    if ok.sum() < 2 or np.isnan(impostor).all():
        return f"the judge found a face in only {int(ok.sum())} of {n} probes: no metrics (FTA {fta})"
    t1 = metrics.tar_at_far(genuine[ok], impostor[~np.isnan(impostor)], 0.01)
    eer, _ = metrics.eer(genuine[ok], impostor[~np.isnan(impostor)])
    prot = np.array([float(probe_e[i] @ orig[i, 0]) for i in range(n)])
    protection = float(np.mean(prot[~np.isnan(prot)] < thr))
    mated = np.array([float(templ[i] @ other_t[i]) for i in range(n)])
    non_mated = np.array([float(templ[i] @ other_t[j]) for i in range(n) for j in range(n) if i != j])
    unl = metrics.unlinkability(mated[~np.isnan(mated)], non_mated[~np.isnan(non_mated)])
    tar = "n/a" if t1.tar is None else f"{t1.tar:.2f}"
    return (
        f"enrol->probe TAR@FAR1% {tar} EER {eer:.3f} gen {np.nanmean(genuine):.3f} imp {np.nanmean(impostor):.3f}"
        f" | protection {protection:.2f} (cos to orig {np.nanmean(prot):.3f}) | D_sys {unl.d_sys:.3f}"
        f" (mated A/B {np.nanmean(mated):.3f}) | FTA {fta}"
    )


def _norm(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="speed", choices=["speed", "quality"])
    ap.add_argument("--bundle", default=str(LITE_DIR))
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CANCELABLE_ENGINE__DEVICE, else cpu)")
    ap.add_argument("--gpu-batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes of the CUDA speed run")
    ap.add_argument("--dry-run", action="store_true", help="run the CUDA speed path on the CPU, tiny (checks the code)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--floor-batch", type=int, default=8, help="batch of the compute-floor comparison (50 steps)")
    ap.add_argument("--ref-images", type=int, default=2)
    ap.add_argument("--ids", type=int, default=12)
    ap.add_argument("--splits", nargs="+", default=["code", "readme"])
    ap.add_argument("--w-key", type=float, default=10.0)
    args = ap.parse_args()
    device = resolve_device(args.device)
    args.device = str(device)
    if args.mode == "speed" and (device.type == "cuda" or args.dry_run):
        args.steps = args.steps or 50
        cmd_cuda(args, device)
    elif args.mode == "speed":
        args.steps = args.steps or 10
        cmd_speed(args)
    else:
        args.steps = args.steps or 50
        cmd_quality(args)


if __name__ == "__main__":
    main()
