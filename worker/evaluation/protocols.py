"""Evaluation protocols: run the engine in-process on a labelled image set and record what the judge sees.

One *shard* run (``run_shard``) takes a list of identities and, per identity ``i`` (subject = folder name,
tenant ``eval``), with ``K >= 3`` key versions ``k = 1..K`` derived by ``worker.keys.derive.derive_seed`` from
random per-run key material (never written anywhere):

- photo A = the identity's first photo, photo B = its second photo, or, for identities with a single photo, a
  *synthetic second capture* of A (flip, small rotation/scale/shift, brightness/contrast, blur, JPEG; seeded by the
  name) -- recorded per identity in ``probe_source``;
- engine call 1 (enrolment): A under every key k -> cancelable faces ``cancel_k{k}``;
- engine call 2 (later, probes; every probe is its own subject, so each is optimised alone -- the engine's batching
  is equivalence-tested): B under key 1 -> ``probe_k1`` (enrol-then-probe); B under key 2 -> ``probe_k2``
  (after revoking version 1, the reissued key's probe); the NEXT identity's photo B under identity i's key 1 ->
  ``impostor_k1`` (a same-key impostor: in verification the probe is always transformed with the claimed
  subject's key);
- no optimisation: ``recon`` = G(E(A)), the best the bundle's encoder/generator can reproduce A (a reference);
- re-inversion attacks on ``cancel_k1`` (see ``reinversion_attack``): ``attack_nokey`` and ``attack_key``.

The judge (``worker.evaluation.evaluator.Evaluator``) embeds the original photos (``orig_a``, ``orig_b``), the
engine's aligned input crop of A (``chip_a``) and every output. Scores are computed only when shards are merged
(``compute_scores``), so cross-identity non-mated pairs span shards. A pairs file (``fold, mated, left, right``)
adds original-vs-original pairs for the ceiling; its rows are split across shards the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from worker.evaluation.evaluator import load_rgb
from worker.evaluation.splits import is_holdout_identity, is_validation_identity  # the project's identity split

TENANT = "eval"
RECORDS = "records.npz"
META = "meta.json"
SHARD_SCHEMA = 1
EXAMPLE_SIZE = 96
EXAMPLE_COLUMNS = (
    "orig_a",
    "chip_a",
    "recon",
    "cancel_k1",
    "cancel_k2",
    "cancel_k3",
    "orig_b",
    "probe_k1",
    "attack_nokey",
    "attack_key",
)


# images the engine or the attack produced (their crop convention is the generator's)
GENERATED_ROLES = frozenset(
    {"recon", "probe_k1", "probe_k2", "impostor_k1", "attack_nokey", "attack_key"}
    | {f"cancel_k{k}" for k in range(1, 65)}
)


def _unit_template(convention: str) -> np.ndarray | None:
    """5 reference points (5, 2) of a named crop convention in unit coordinates, or None if unknown."""
    try:
        from worker.models.alignment import template

        return np.asarray(template(convention), dtype=np.float32)
    except (ImportError, KeyError, ValueError):
        return None


class Judge(Protocol):
    embedding_dim: int

    def embed_many(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 images -> (embeddings (N, D) with NaN rows for misses, found (N,) bool)."""
        ...


@dataclass(frozen=True)
class RunConfig:
    data_dir: str
    pairs_file: str | None = None
    split: str = "val"  # "val", "train", "all" or "holdout" (worker.evaluation.splits: sha256 % 10 == 0 / != 0 / 3)
    identities: int = 50
    keys: int = 3
    steps: int | None = None  # None: the engine config's default
    attack_steps: int = 50
    shard_index: int = 0
    shard_count: int = 1
    chunk: int = 8  # identities per engine batch
    examples: int = 6  # identities per shard kept as example faces
    pairs_limit: int | None = None  # max pairs-file rows (whole file when None)
    threshold_pool: int = 0  # photo A of up to this many identities of the split, for original non-mated pairs
    time_budget_s: float | None = None  # stop starting new batches of identities when this would be exceeded
    fallback_alignment: bool = True  # generator outputs the judge's detector misses: align by the known convention

    def __post_init__(self) -> None:
        if self.keys < 3:
            raise ValueError("the protocols need at least 3 keys")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError("shard index must be in [0, shard count)")
        if self.split not in ("val", "train", "all", "holdout"):
            raise ValueError("split must be val, train, all or holdout")


# --- inputs -------------------------------------------------------------------------------------------------------
def list_identities(data_dir: str | Path, split: str = "val", limit: int | None = None) -> list[tuple[str, list[Path]]]:
    """Identity folders of ``split`` in a fixed pseudo-random order (sha256 of the name), first ``limit``.

    Identities with two or more photos come first, so a small run uses real second photos where the split has them.
    """
    root = Path(data_dir)
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        val = is_validation_identity(d.name)
        if (split == "val" and not val) or (split == "train" and val):
            continue
        if split == "holdout" and not is_holdout_identity(d.name):  # never trained on; many have 2+ photos
            continue
        photos = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if photos:
            out.append((d.name, photos))
    out.sort(key=lambda item: (len(item[1]) < 2, hashlib.sha256(item[0].encode()).hexdigest()))
    return out[:limit] if limit is not None else out


def read_pairs(path: str | Path) -> list[tuple[int, bool, str, str]]:
    """Pairs file with a header ``fold, mated, left, right`` (tab-separated, paths relative to the image root)."""
    rows = []
    for line in Path(path).read_text().splitlines()[1:]:
        if line.strip():
            fold, mated, left, right = line.split("\t")
            rows.append((int(fold), mated.strip() == "1", left, right))
    return rows


def synthetic_capture(rgb: np.ndarray, seed: int) -> np.ndarray:
    """A second "capture" of the same photo: mirror, rotate +-6 deg, scale 0.93-1.07, shift +-4 %, brightness and
    contrast +-12 %, slight blur, JPEG quality 70. RGB uint8 (H, W, 3) -> same shape. Deterministic in ``seed``.
    """
    import cv2

    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    img = rgb[:, ::-1]
    angle, scale = rng.uniform(-6, 6), rng.uniform(0.93, 1.07)
    m: np.ndarray = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += rng.uniform(-0.04, 0.04, 2) * (w, h)
    img = cv2.warpAffine(np.ascontiguousarray(img), m, (w, h), borderMode=cv2.BORDER_REPLICATE)
    img = img.astype(np.float32) * rng.uniform(0.88, 1.12) + rng.uniform(-0.12, 0.12) * 255 * 0.25
    img = cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (3, 3), rng.uniform(0.3, 0.9))
    ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 70])
    return cast(np.ndarray, cv2.imdecode(buf, cv2.IMREAD_COLOR))[:, :, ::-1].copy() if ok else img


def _name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(("capture:" + name).encode()).digest()[:8], "big")


def to_uint8(image) -> np.ndarray:
    """Engine image (3, G, G) torch tensor in [-1, 1] -> RGB uint8 (G, G, 3)."""
    arr = image.detach().float().cpu().clamp(-1, 1).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(np.round((arr + 1.0) * 127.5).astype(np.uint8))


def _thumb(rgb: np.ndarray, size: int = EXAMPLE_SIZE) -> np.ndarray:
    import cv2

    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if rgb.shape[0] > size else cv2.INTER_CUBIC)


# --- the re-inversion attack ----------------------------------------------------------------------------------------
def reinversion_attack(engine: Any, cancel_images, seeds: Sequence[bytes], steps: int = 100, lr: float = 0.01):
    """Try to recover the original face from cancelable faces (B, 3, G, G) in [-1, 1]. Returns (no_key, key_known).

    - no key: the attacker has only the cancelable image and the bundle: ``G(E(x_c))``.
    - key known: the attacker also holds the subject's seed, hence the key's synthetic latent and the layer split.
      The layers that came from the real code and were NOT optimised are the original's own code, untouched; the
      key layers and the optimised layers are not. The attacker (1) inverts x_c *through the known mixing*: starting
      from E(x_c), optimises the real-derived layers (``steps`` Adam steps on pixel MSE) with the key layers fixed to
      the key latent, so the fit explains x_c the way the engine built it; (2) replaces the key layers and the
      optimised layers by the mean of the recovered untouched layers (style-based encoders produce W+ codes that are
      nearly constant across layers, so this is the best estimate of the discarded original layers without the
      original); (3) decodes. ``steps = 0`` skips (1) and substitutes on E(x_c) directly.
    """
    import torch
    import torch.nn.functional as F

    from worker.algorithm.keylatent import key_latents

    gen, enc, split = engine.generator, engine.encoder, engine.split
    device = engine.device
    x = cancel_images.to(device).float()
    size = int(enc.input_size)
    with torch.no_grad():
        x_in = x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        w_c = enc(x_in).float()
        no_key = gen.synthesis(w_c).float().clamp(-1, 1)
        w_key = key_latents(gen, list(seeds), engine.config.truncation_psi).to(device)
    from_key = list(split.from_key)
    from_real = list(split.from_real)
    untouched = [i for i in from_real if i not in split.trainable] or from_real
    w = w_c.clone()
    if from_key:
        w[:, from_key] = w_key[:, from_key]
    if steps > 0 and from_real:
        free = w_c[:, from_real].clone().requires_grad_(True)
        opt = torch.optim.Adam([free], lr=lr)
        real_idx = torch.tensor(from_real, device=device)
        for _ in range(steps):
            opt.zero_grad()
            img = gen.synthesis(torch.index_copy(w, 1, real_idx, free))
            if img.shape[-1] != x.shape[-1]:
                img = F.interpolate(img, size=x.shape[-2:], mode="bilinear", align_corners=False)
            F.mse_loss(img.float(), x).backward()
            opt.step()
        w[:, from_real] = free.detach()
    fill = w[:, untouched].mean(1, keepdim=True)
    replace = sorted(set(from_key) | set(split.trainable))
    w[:, replace] = fill.expand(-1, len(replace), -1)
    with torch.no_grad():
        key_known = gen.synthesis(w).float().clamp(-1, 1)
    return no_key.cpu(), key_known.cpu()


# --- one shard ------------------------------------------------------------------------------------------------------
@dataclass
class ShardState:
    names: list[str] = field(default_factory=list)
    probe_source: list[str] = field(default_factory=list)
    impostor_name: list[str] = field(default_factory=list)
    images: dict[str, list[np.ndarray]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[np.ndarray] = field(default_factory=list)
    example_names: list[str] = field(default_factory=list)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prepare_all(engine: Any, items: list[tuple[str, list[Path]]], state: ShardState):
    """Load and align photo A and B per identity; skip (and count) identities the engine's detector rejects."""
    from worker.errors import CancelableError

    prepared = []
    for name, photos in items:
        a_rgb = load_rgb(photos[0])
        try:
            a = engine.prepare(a_rgb)
            if len(photos) >= 2:
                b_rgb, source = load_rgb(photos[1]), "second-photo"
                b = engine.prepare(b_rgb)
            else:
                # a synthetic capture the detector rejects (a background face grown by the zoom, a dark frame) is
                # retaken with the next seed, up to 3 times, as a user would retake a photo
                source = "synthetic-capture"
                for attempt in range(3):
                    b_rgb = synthetic_capture(a_rgb, _name_seed(name) + attempt)
                    try:
                        b = engine.prepare(b_rgb)
                        break
                    except CancelableError:
                        if attempt == 2:
                            raise
        except CancelableError as exc:
            state.skipped[exc.code] = state.skipped.get(exc.code, 0) + 1
            continue
        a2 = None  # a second enrolment photo (the product's two-photo enrolment), when the identity has one
        if len(photos) >= 3:
            try:
                a2 = engine.prepare(load_rgb(photos[2]))
            except CancelableError:
                a2 = None
        prepared.append((name, a_rgb, b_rgb, a, b, source, a2))
    return prepared


def run_shard(
    engine: Any,
    judge: Judge,
    cfg: RunConfig,
    out_dir: str | Path,
    key_material: bytes | None = None,
    log: Callable[[str], None] = _log,
    extra_meta: dict | None = None,
) -> Path:
    """Run every protocol on this shard's identities and write ``records.npz`` + ``meta.json`` to ``out_dir``."""
    import torch
    import torch.nn.functional as F

    from worker.keys.derive import derive_seed

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_material = key_material if key_material is not None else os.urandom(32)
    everyone = list_identities(cfg.data_dir, cfg.split, cfg.identities)
    mine = everyone[cfg.shard_index :: cfg.shard_count]
    state = ShardState()
    roles = ["orig_a", "orig_b", "chip_a", "recon", "probe_k1", "probe_k2", "impostor_k1", "attack_nokey", "attack_key"]
    roles += [f"cancel_k{k}" for k in range(1, cfg.keys + 1)]
    emb: dict[str, list[np.ndarray]] = {r: [] for r in roles}
    eng_roles = ["eng_cancel_k1", "eng_cancel_k2", "eng_cancel2_k1", "eng_probe_k1", "eng_probe_k2", "eng_impostor_k1"]
    eng: dict[str, list[np.ndarray]] = {r: [] for r in eng_roles}  # engine (in-loss recognizer) embeddings
    fallback = _unit_template(engine.generator.alignment) if cfg.fallback_alignment else None
    judge_missed: dict[str, int] = {}
    t0 = time.time()
    t_engine = t_judge = 0.0
    done = 0
    # the cheap, fixed-cost parts first, so a time budget only cuts the number of identities
    pairs = _pairs_shard(judge, cfg, log)
    pairs.update(_pool_shard(judge, cfg, log))
    log(f"[eval] shard {cfg.shard_index}/{cfg.shard_count}: {len(mine)} identities, {cfg.keys} keys")
    stopped_early = False
    t_loop = time.time()
    for start in range(0, len(mine), cfg.chunk):
        if cfg.time_budget_s is not None and done:
            per_chunk = (time.time() - t_loop) / done * cfg.chunk
            if time.time() - t0 + per_chunk > cfg.time_budget_s:
                stopped_early = True
                log(f"[eval] time budget {cfg.time_budget_s:.0f}s reached: stopping after {done} identities")
                break
        part = _prepare_all(engine, mine[start : start + cfg.chunk], state)
        if not part:
            done += min(cfg.chunk, len(mine) - start)
            continue
        n = len(part)
        seeds = [[derive_seed(key_material, TENANT, name, k) for k in range(1, cfg.keys + 1)] for name, *_ in part]
        te = time.time()
        # call 1: enrolment of photo A under every key
        enrolled = engine.enroll_many([(p[3][None], seeds[i][k]) for i, p in enumerate(part) for k in range(cfg.keys)])
        cancel = [[to_uint8(enrolled[i * cfg.keys + k].images[0]) for k in range(cfg.keys)] for i in range(n)]
        # call 2, later: probes, each its own subject (optimised alone)
        probes = [(p[4][None], seeds[i][k]) for i, p in enumerate(part) for k in (0, 1)]
        if n > 1:  # same-key impostor: the next identity's photo B under this identity's key 1
            probes += [(part[(i + 1) % n][4][None], seeds[i][0]) for i in range(n)]
        probed = engine.enroll_many(probes)
        # the product's own view (engine embeddings, as ``cancelable verify`` scores): photo A alone is the one-photo
        # template; with a third photo, A + A2 under key 1 is the two-photo template (each image runs alone)
        second = [i for i, p in enumerate(part) if p[6] is not None]
        extra = engine.enroll_many([(part[i][6][None], seeds[i][0]) for i in second]) if second else []

        def coords(res: Any) -> np.ndarray:  # the matcher's coordinates (linear: a template's are its photos' mean)
            return engine.match_coords(F.normalize(res.embeddings[:1].float(), dim=-1))[0].numpy()

        dim = int(engine.match_coords(torch.zeros(1, engine.embedding_dim)).shape[1])
        eng_a2 = np.full((n, dim), np.nan, dtype=np.float32)
        for i, r in zip(second, extra, strict=True):
            eng_a2[i] = coords(r)
        eng_rows = {
            "eng_cancel_k1": [coords(enrolled[i * cfg.keys]) for i in range(n)],
            "eng_cancel_k2": [coords(enrolled[i * cfg.keys + 1]) for i in range(n)],
            "eng_probe_k1": [coords(probed[2 * i]) for i in range(n)],
            "eng_probe_k2": [coords(probed[2 * i + 1]) for i in range(n)],
            "eng_impostor_k1": [
                coords(probed[2 * n + i]) if n > 1 else np.full(dim, np.nan, dtype=np.float32) for i in range(n)
            ],
        }
        for role, rows in eng_rows.items():
            eng[role].append(np.stack(rows).astype(np.float32))
        eng["eng_cancel2_k1"].append(eng_a2)
        with torch.no_grad():
            faces_a = torch.stack([p[3] for p in part]).to(engine.device)
            recon = engine.generator.synthesis(engine.encoder(faces_a).float()).float().clamp(-1, 1).cpu()
        c1 = torch.stack([enrolled[i * cfg.keys].images[0] for i in range(n)])
        from worker.algorithm.keymap_engine import KeymapEngine
        from worker.evaluation.keymap_attack import keymap_reinversion_attack

        if isinstance(engine, KeymapEngine):  # the keymap family's own, stronger attack
            nokey, keyknown = keymap_reinversion_attack(engine, c1, [s[0] for s in seeds], cfg.attack_steps)
        else:
            nokey, keyknown = reinversion_attack(engine, c1, [s[0] for s in seeds], cfg.attack_steps)
        t_engine += time.time() - te
        tj = time.time()
        batch: dict[str, list[np.ndarray]] = {
            "orig_a": [p[1] for p in part],
            "orig_b": [p[2] for p in part],
            "chip_a": [to_uint8(p[3]) for p in part],
            "recon": [to_uint8(r) for r in recon],
            "probe_k1": [to_uint8(probed[2 * i].images[0]) for i in range(n)],
            "probe_k2": [to_uint8(probed[2 * i + 1].images[0]) for i in range(n)],
            "attack_nokey": [to_uint8(x) for x in nokey],
            "attack_key": [to_uint8(x) for x in keyknown],
        }
        if n > 1:
            batch["impostor_k1"] = [to_uint8(probed[2 * n + i].images[0]) for i in range(n)]
        for k in range(cfg.keys):
            batch[f"cancel_k{k + 1}"] = [c[k] for c in cancel]
        for role, imgs in batch.items():
            generated = role in GENERATED_ROLES or role.startswith("cancel_k")
            if generated and fallback is not None and hasattr(judge, "embed_with_fallback"):
                e, detected = judge.embed_with_fallback(imgs, fallback)
            else:
                e, detected = judge.embed_many(imgs)
            emb[role].append(e)
            judge_missed[role] = judge_missed.get(role, 0) + int((~detected).sum())
        if n == 1:  # a batch of one has no other identity to impersonate it: no impostor score
            emb["impostor_k1"].append(np.full((1, judge.embedding_dim), np.nan, dtype=np.float32))
        t_judge += time.time() - tj
        for i, p in enumerate(part):
            state.names.append(p[0])
            state.probe_source.append(p[5])
            state.impostor_name.append(part[(i + 1) % n][0] if n > 1 else "")
            if len(state.examples) < cfg.examples:
                state.examples.append(np.stack([_thumb(batch[c][i]) for c in EXAMPLE_COLUMNS if c in batch]))
                state.example_names.append(p[0])
        done += min(cfg.chunk, len(mine) - start)
        per_identity = (time.time() - t_loop) / done
        log(
            f"[eval] {done}/{len(mine)} identities  elapsed {time.time() - t0:6.0f}s  "
            f"ETA {per_identity * (len(mine) - done):6.0f}s  "
            f"({per_identity:.1f}s/identity; engine {t_engine:.0f}s, judge {t_judge:.0f}s)"
        )
    arrays: dict[str, np.ndarray] = {
        "names": np.array(state.names, dtype=str),
        "probe_source": np.array(state.probe_source, dtype=str),
        "impostor_name": np.array(state.impostor_name, dtype=str),
    }
    dim = judge.embedding_dim
    for role, parts in emb.items():
        arrays[f"emb_{role}"] = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    for role, parts in eng.items():
        arrays[role] = np.concatenate(parts) if parts else np.zeros((0, engine.embedding_dim), np.float32)
    arrays.update(pairs)
    if state.examples:
        arrays["examples"] = np.stack(state.examples)
        arrays["example_names"] = np.array(state.example_names, dtype=str)
    # cast: the numpy stub types ``**kwds`` as if a key could be ``allow_pickle`` (bool)
    np.savez_compressed(out / RECORDS, **cast(dict[str, Any], arrays))
    meta = {
        "shard_schema": SHARD_SCHEMA,
        "config": asdict(cfg),
        "engine": _engine_info(engine),
        "n_identities_selected": len(mine),
        "n_identities_done": len(state.names),
        "stopped_by_time_budget": stopped_early,
        "skipped_by_engine": state.skipped,
        "judge_detection_misses": judge_missed,
        "fallback_alignment": fallback is not None,
        "example_columns": [c for c in EXAMPLE_COLUMNS if c in emb],
        "seconds": {"total": time.time() - t0, "engine": t_engine, "judge": t_judge},
        **(extra_meta or {}),
    }
    (out / META).write_text(json.dumps(meta, indent=2))
    log(f"[eval] shard written to {out} ({len(state.names)} identities, {time.time() - t0:.0f}s)")
    return out


def _pairs_shard(judge: Judge, cfg: RunConfig, log: Callable[[str], None]) -> dict[str, np.ndarray]:
    if not cfg.pairs_file:
        return {}
    rows = read_pairs(cfg.pairs_file)
    if cfg.pairs_limit is not None:  # keep the file's balance: take rows evenly from every fold
        rows = rows[:: max(1, len(rows) // cfg.pairs_limit)][: cfg.pairs_limit]
    rows = rows[cfg.shard_index :: cfg.shard_count]
    root = Path(cfg.data_dir)
    paths = sorted({r[2] for r in rows} | {r[3] for r in rows})
    log(f"[eval] pairs file: {len(rows)} pairs, {len(paths)} images to embed")
    t = time.time()
    emb, _ = judge.embed_many([load_rgb(root / p) for p in paths])
    where = {p: i for i, p in enumerate(paths)}
    log(f"[eval] pairs embedded in {time.time() - t:.0f}s")
    return {
        "pairs_left": emb[[where[r[2]] for r in rows]],
        "pairs_right": emb[[where[r[3]] for r in rows]],
        "pairs_mated": np.array([r[1] for r in rows], dtype=bool),
        "pairs_left_identity": np.array([r[2].split("/")[0] for r in rows], dtype=str),
    }


def _pool_shard(judge: Judge, cfg: RunConfig, log: Callable[[str], None]) -> dict[str, np.ndarray]:
    """Embed photo A of the first ``threshold_pool`` identities of the split (this shard's share): non-mated
    original pairs for the FMR 0.1 % threshold that cost no engine time."""
    if cfg.threshold_pool <= 0:
        return {}
    pool = list_identities(cfg.data_dir, cfg.split, cfg.threshold_pool)[cfg.shard_index :: cfg.shard_count]
    t = time.time()
    emb, _ = judge.embed_many([load_rgb(photos[0]) for _, photos in pool])
    log(f"[eval] threshold pool: {len(pool)} original photos embedded in {time.time() - t:.0f}s")
    return {"pool_names": np.array([n for n, _ in pool], dtype=str), "pool_emb": emb}


def _engine_info(engine: Any) -> dict:
    cfg = getattr(engine, "config", None)
    bundle = getattr(engine, "bundle", None)
    return {
        "bundle_id": getattr(bundle, "bundle_id", None),
        "bundle_hashes": dict(getattr(bundle, "hashes", {}) or {}),
        "split": engine.split.describe() if hasattr(engine, "split") else None,
        "steps": getattr(cfg, "steps", None),
        "key_target": getattr(cfg, "key_target", None),
        "truncation_psi": getattr(cfg, "truncation_psi", None),
        "input_size": getattr(engine, "input_size", None),
        "output_size": getattr(engine, "output_size", None),
        "device": str(getattr(engine, "device", "")),
        "matcher_kind": getattr(engine, "matcher_kind", "cosine"),
    }


# --- merging shards and computing scores ---------------------------------------------------------------------------
def load_shards(shard_dirs: Sequence[str | Path]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Concatenate the records of several shard directories (in the given order) -> (arrays, metas)."""
    metas, loaded = [], []
    for d in shard_dirs:
        d = Path(d)
        meta = json.loads((d / META).read_text())
        if meta.get("shard_schema") != SHARD_SCHEMA:
            raise ValueError(f"{d}: unknown shard schema {meta.get('shard_schema')}")
        metas.append(meta)
        with np.load(d / RECORDS) as z:
            loaded.append({k: z[k] for k in z.files})
    keys = sorted(set().union(*(x.keys() for x in loaded)))
    merged: dict[str, Any] = {}  # every key comes from some shard, so the ``else parts`` branch never runs
    for k in keys:
        parts = [x[k] for x in loaded if k in x]
        merged[k] = np.concatenate(parts) if parts else parts
    if len(set(merged["names"].tolist())) != len(merged["names"]):
        raise ValueError("the same identity appears in two shards (merge each shard once)")
    return merged, metas


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (N, D) and (N, D) -> (N,) (NaN where an embedding is missing)."""
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _cross(a: np.ndarray, b: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Cosines of all (i, j), i != j, between rows of a and b, subsampled to at most ``limit`` (seeded)."""
    n = len(a)
    if n < 2:
        return np.zeros(0)
    sims = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    vals = sims[~np.eye(n, dtype=bool)]
    if vals.size > limit:
        vals = np.random.default_rng(seed).choice(vals, limit, replace=False)
    return vals


def _cross_upper(a: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Cosines of unordered pairs i < j within a (symmetric scores counted once)."""
    n = len(a)
    if n < 2:
        return np.zeros(0)
    u = a / np.linalg.norm(a, axis=1, keepdims=True)
    vals = (u @ u.T)[np.triu_indices(n, 1)]
    if vals.size > limit:
        vals = np.random.default_rng(seed).choice(vals, limit, replace=False)
    return vals


def compute_scores(rec: dict[str, np.ndarray], keys: int, limit: int = 500_000, seed: int = 0) -> dict[str, Any]:
    """All score sets of every protocol from merged records. NaN marks a failure to acquire (judge found no face)."""
    e = {k[4:]: v for k, v in rec.items() if k.startswith("emb_")}
    n = len(rec["names"])
    second = rec["probe_source"] == "second-photo"
    s: dict[str, Any] = {"n_identities": n, "n_second_photo": int(second.sum())}

    # original vs original (ceiling): pairs file + same-identity A/B with a real second photo; impostors: A x A
    gen = [_cos(e["orig_a"][second], e["orig_b"][second])]
    originals = e["orig_a"]
    if "pool_emb" in rec and len(rec["pool_emb"]):
        in_pool = set(rec["pool_names"].tolist())
        extra = np.array([name not in in_pool for name in rec["names"].tolist()], dtype=bool)
        originals = np.concatenate([rec["pool_emb"], e["orig_a"][extra]])
    s["n_original_photos_for_impostors"] = int(len(originals))
    imp = [_cross_upper(originals, limit, seed)]
    if "pairs_mated" in rec and len(rec["pairs_mated"]):
        pc = _cos(rec["pairs_left"], rec["pairs_right"])
        gen.append(pc[rec["pairs_mated"]])
        imp.append(pc[~rec["pairs_mated"]])
    s["original"] = {"genuine": np.concatenate(gen), "impostor": np.concatenate(imp)}

    # cancelable vs cancelable, same key, enrol (A, key 1) then probe (B, key 1) in a separate run
    g1, g2 = _cos(e["cancel_k1"], e["probe_k1"]), _cos(e["cancel_k2"], e["probe_k2"])
    s["enrol_probe"] = {
        "genuine": np.concatenate([g1, g2]),  # key 1 and (after reissue) key 2: two enrol/probe pairs per identity
        "impostor_same_key": _cos(e["cancel_k1"], e["impostor_k1"]),
        "impostor_other_key": _cross(e["cancel_k1"], e["probe_k1"], limit, seed),
        "genuine_synthetic_capture": np.concatenate([g1[~second], g2[~second]]),
        "genuine_second_photo": np.concatenate([g1[second], g2[second]]),
    }
    # protection: cancelable (every key) vs the original photo it came from, and vs the engine's input crop
    cancels = [e[f"cancel_k{k}"] for k in range(1, keys + 1)]
    s["protection"] = {
        "vs_original_photo": np.concatenate([_cos(c, e["orig_a"]) for c in cancels]),
        "vs_input_crop": np.concatenate([_cos(c, e["chip_a"]) for c in cancels]),
        "vs_other_photo": np.concatenate([_cos(c, e["orig_b"]) for c in cancels]),
        "recon_vs_original_photo": _cos(e["recon"], e["orig_a"]),
        "recon_vs_input_crop": _cos(e["recon"], e["chip_a"]),
    }
    # unlinkability: same person under keys a != b (mated) vs different persons under keys a != b (non-mated)
    mated, non_mated = [], []
    per_pair = max(1, limit // max(1, keys * (keys - 1) // 2))
    for a in range(keys):
        for b in range(a + 1, keys):
            mated.append(_cos(cancels[a], cancels[b]))
            non_mated.append(_cross(cancels[a], cancels[b], per_pair, seed + 31 * a + b))
    s["unlinkability"] = {"mated": np.concatenate(mated), "non_mated": np.concatenate(non_mated)}
    # revocation: key 1 revoked, key 2 reissued
    s["revocation"] = {
        "reissued_vs_revoked": _cos(e["cancel_k2"], e["cancel_k1"]),
        "new_probe_vs_revoked": _cos(e["probe_k2"], e["cancel_k1"]),
        "new_probe_vs_reissued": _cos(e["probe_k2"], e["cancel_k2"]),
    }
    # re-inversion attack on cancel_k1, judged against the original photo (and the other photo)
    s["attack"] = {
        "no_key_vs_original_photo": _cos(e["attack_nokey"], e["orig_a"]),
        "key_known_vs_original_photo": _cos(e["attack_key"], e["orig_a"]),
        "no_key_vs_other_photo": _cos(e["attack_nokey"], e["orig_b"]),
        "key_known_vs_other_photo": _cos(e["attack_key"], e["orig_b"]),
    }
    s["failures_to_acquire"] = {role: int(np.isnan(v).any(axis=1).sum()) for role, v in e.items()}
    # different people's cancelable faces (each under its own key 1): where a deployment sets its threshold
    s["different_people"] = _cross_upper(e["cancel_k1"], limit, seed)
    if "eng_cancel_k1" in rec:
        s["product"] = product_scores(rec, limit, seed)
    return s


def product_scores(rec: dict[str, np.ndarray], limit: int = 500_000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """The product's own verify scores (cosine of engine embeddings in the matcher's coordinates), per enrolment
    size ("1": photo A; "2": photos A and A2, identities with a third photo only): genuine (probe B under the same
    key, key 1 and after reissue key 2), same-key impostor (another identity's photo under the victim's key 1),
    other-key impostors (other identities' probes under their own key 1), old-key probe against the reissued
    template (probe under key 1 vs the key-2 template)."""

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    p1, p2, imp = rec["eng_probe_k1"], rec["eng_probe_k2"], rec["eng_impostor_k1"]
    out: dict[str, dict[str, Any]] = {}
    one_k1, one_k2 = unit(rec["eng_cancel_k1"]), unit(rec["eng_cancel_k2"])
    out["1"] = {
        "genuine": _cos(one_k1, p1),
        "genuine_reissued": _cos(one_k2, p2),
        "impostor_same_key": _cos(one_k1, imp),
        "impostor_other_key": _cross(one_k1, p1, limit, seed),
        "old_key_probe_vs_reissued": _cos(one_k2, p1),
    }
    has2 = np.isfinite(rec["eng_cancel2_k1"]).all(axis=1)
    if has2.sum() >= 2:
        # the worker's template is the normalised mean of the photos' unit embeddings; the coordinates are linear
        two = unit(rec["eng_cancel_k1"][has2] + rec["eng_cancel2_k1"][has2])
        out["2"] = {
            "genuine": _cos(two, p1[has2]),
            "impostor_same_key": _cos(two, imp[has2]),
            "impostor_other_key": _cross(two, p1[has2], limit, seed),
        }
    return out
