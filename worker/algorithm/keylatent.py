"""Seed -> synthetic key latent, and seed -> key-derived random orthogonal matrix.

Everything random is drawn on the CPU by ``torch.Generator`` objects seeded from the 32-byte seed, so the draw is
bit-identical on every machine and device (for a given torch version; tests/unit/algorithm/test_keylatent.py pins a
regression vector so an upgrade that changes the CPU generator is caught before templates become unverifiable).

A torch generator takes a 64-bit seed. To keep all 256 bits of the seed in play, every draw uses four generators
(one per 64-bit word of a labelled SHA-256 of the seed) and combines them: ``z = (z_1 + z_2 + z_3 + z_4) / 2``
is again exactly N(0, I) and depends on every bit of the seed.
"""

from __future__ import annotations

import hashlib

import torch

from worker.models.base import Generator

SEED_BYTES = 32


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes")


def _generators(seed: bytes, label: str) -> list[torch.Generator]:
    """Four CPU generators seeded from SHA-256(len(label) || label || seed): a separate stream per label."""
    _check_seed(seed)
    tag = label.encode()
    digest = hashlib.sha256(len(tag).to_bytes(4, "big") + tag + bytes(seed)).digest()
    gens = []
    for i in range(4):
        g = torch.Generator(device="cpu")
        g.manual_seed(int.from_bytes(digest[8 * i : 8 * i + 8], "big"))
        gens.append(g)
    return gens


def seeded_normal(seed: bytes, shape: tuple[int, ...], label: str) -> torch.Tensor:
    """N(0, 1) tensor of ``shape`` (float64, CPU), a pure function of (seed, label, shape)."""
    total = torch.zeros(shape, dtype=torch.float64)
    for g in _generators(seed, label):
        total += torch.randn(shape, generator=g, dtype=torch.float64)
    return total / 2.0


def seed_to_z(seed: bytes, z_dim: int) -> torch.Tensor:
    """32-byte seed -> z (z_dim,) float32 on the CPU, ~N(0, I)."""
    return seeded_normal(seed, (z_dim,), "z").to(torch.float32)


@torch.no_grad()
def key_latent(generator: Generator, seed: bytes, psi: float = 0.7) -> torch.Tensor:
    """Key's synthetic W+ code: z -> mapping -> truncation toward ``w_avg`` by ``psi`` -> repeated over layers.

    Returns (n_latent, w_dim) float32 (float64 for a float64 generator) on the device of ``generator.w_avg``.
    The mapping runs outside any autocast region, so the same seed gives the same latent up to rounding on every
    device.
    """
    if not 0.0 <= psi <= 1.0:
        raise ValueError("truncation psi must be in [0, 1]")
    dtype = torch.float64 if generator.w_avg.dtype == torch.float64 else torch.float32
    w_avg = generator.w_avg.detach().to(dtype)
    z = seeded_normal(seed, (generator.z_dim,), "z").to(torch.float32).to(device=w_avg.device, dtype=dtype)
    with torch.autocast(device_type=w_avg.device.type, enabled=False):
        w = generator.mapping(z[None]).to(dtype)[0]
    w = w_avg + psi * (w - w_avg)
    return w[None, :].expand(generator.n_latent, generator.w_dim).clone()


def key_latents(generator: Generator, seeds: list[bytes], psi: float = 0.7) -> torch.Tensor:
    """``key_latent`` for several seeds -> (S, n_latent, w_dim).

    Each seed is mapped on its own (the mapping is cheap next to the optimisation), so a subject's key latent is
    bit-identical whatever other subjects share the batch.
    """
    return torch.stack([key_latent(generator, s, psi) for s in seeds])


def key_orthogonal(seed: bytes, dim: int, label: str = "orthogonal") -> torch.Tensor:
    """Key-derived Haar-random orthogonal matrix (dim, dim), float32 on the CPU.

    QR of a seeded Gaussian matrix in float64, with the signs of R's diagonal folded into Q so the result is
    uniformly distributed over O(dim) (and unique for the draw).
    """
    a = seeded_normal(seed, (dim, dim), label)
    q, r = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs[None, :]).to(torch.float32)


def key_rotation_about(seed: bytes, center: torch.Tensor, label: str = "orthogonal") -> torch.Tensor:
    """Key-derived orthogonal matrix (D, D) that fixes the direction ``center`` (D,) and is Haar-random on the
    hyperplane orthogonal to it; float32 on the CPU.

    Recognizers such as dlib put every face inside a narrow cone around their mean embedding (any two faces score
    about 0.8). A full random rotation sends a target outside that cone, where no face can follow; rotating only
    about the mean keeps every target's angle to the mean, so targets stay reachable while cosines between targets
    are still exactly the cosines between the originals. Built as H diag(1, Q) H with Q = ``key_orthogonal`` of
    size D - 1 and H the Householder reflection that swaps ``center`` and the first axis.
    """
    c = torch.nn.functional.normalize(center.detach().to(torch.float64).cpu().flatten(), dim=0)
    d = c.numel()
    q = key_orthogonal(seed, d - 1, label).to(torch.float64)
    block = torch.eye(d, dtype=torch.float64)
    block[1:, 1:] = q
    v = c.clone()
    v[0] -= 1.0
    if float(v.norm()) < 1e-12:  # center is already the first axis
        return block.to(torch.float32)
    v = v / v.norm()
    h = torch.eye(d, dtype=torch.float64) - 2.0 * torch.outer(v, v)
    return (h @ block @ h).to(torch.float32)


def key_target(e_orig: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Key-seeded identity target t = normalise(R_key e_orig) for each row of ``e_orig`` (B, D) -> (B, D).

    ``rotation`` is (D, D) or per-sample (B, D, D). A rotation keeps cosines, so images of one person (close
    ``e_orig``) get close targets, other people stay apart, and different keys send one person to unrelated
    targets. R_key is invertible: whoever holds the key can map a target back to ``e_orig`` (see docs/decisions.md).
    """
    # float64 and an explicit per-row product-sum: a row's target must not depend on how many rows share the call
    # (a BLAS gemm and gemv round differently, and Adam can amplify such differences in near-zero gradients)
    e = torch.nn.functional.normalize(e_orig.to(torch.float64), dim=-1)
    r = rotation.to(device=e.device, dtype=torch.float64)
    t = (r * e[:, None, :]).sum(-1)  # (D, D) or (B, D, D) times (B, 1, D) -> (B, D) = R e per row
    return torch.nn.functional.normalize(t, dim=-1).to(torch.float32)
