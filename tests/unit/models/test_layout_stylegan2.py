"""StyleGAN2 loaders against small random checkpoints written in the exact public layouts (rosinality, genforce).

The ``*_state`` builders below write every key, nesting and shape of the public formats (smaller widths); the golden
fixtures (tests/fixtures/golden/) were produced by loading the very same states into the reference code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from worker.errors import CheckpointLayoutError
from worker.models.base import Generator
from worker.models.stylegan2 import (
    StyleGAN2Generator,
    fir_kernel,
    load_genforce,
    load_rosinality,
    upfirdn2d,
)

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "golden"
torch.set_num_threads(1)


def _rand(g: torch.Generator, *shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=g) * scale + offset


def rosinality_state(size: int, style_dim: int, n_mlp: int, channels: dict[int, int], seed: int = 0) -> dict:
    """A ``g_ema`` state dict in rosinality's key names and shapes (random values, realistic scales)."""
    g = torch.Generator().manual_seed(seed)
    s: dict[str, torch.Tensor] = {}
    for i in range(1, n_mlp + 1):
        s[f"style.{i}.weight"] = _rand(g, style_dim, style_dim, scale=100.0)  # stored / lr_mul (0.01)
        s[f"style.{i}.bias"] = _rand(g, style_dim, scale=10.0)
    c4 = channels[4]
    s["input.input"] = _rand(g, 1, c4, 4, 4)

    def styled(prefix: str, cin: int, cout: int, up: bool) -> None:
        s[f"{prefix}.conv.weight"] = _rand(g, 1, cout, cin, 3, 3)
        if up:
            s[f"{prefix}.conv.blur.kernel"] = fir_kernel(gain=4.0)
        s[f"{prefix}.conv.modulation.weight"] = _rand(g, cin, style_dim)
        s[f"{prefix}.conv.modulation.bias"] = _rand(g, cin, scale=0.1, offset=1.0)
        s[f"{prefix}.noise.weight"] = _rand(g, 1, scale=0.1)
        s[f"{prefix}.activate.bias"] = _rand(g, cout, scale=0.1)

    def to_rgb(prefix: str, cin: int, up: bool) -> None:
        if up:
            s[f"{prefix}.upsample.kernel"] = fir_kernel(gain=4.0)
        s[f"{prefix}.conv.weight"] = _rand(g, 1, 3, cin, 1, 1)
        s[f"{prefix}.conv.modulation.weight"] = _rand(g, cin, style_dim)
        s[f"{prefix}.conv.modulation.bias"] = _rand(g, cin, scale=0.1, offset=1.0)
        s[f"{prefix}.bias"] = _rand(g, 1, 3, 1, 1, scale=0.1)

    styled("conv1", c4, c4, False)
    to_rgb("to_rgb1", c4, False)
    log_size = int(math.log2(size))
    for layer in range((log_size - 2) * 2 + 1):
        res = 2 ** ((layer + 5) // 2)
        s[f"noises.noise_{layer}"] = _rand(g, 1, 1, res, res)
    cin = c4
    for i in range(3, log_size + 1):
        cout = channels[2**i]
        styled(f"convs.{2 * (i - 3)}", cin, cout, True)
        styled(f"convs.{2 * (i - 3) + 1}", cout, cout, False)
        to_rgb(f"to_rgbs.{i - 3}", cout, True)
        cin = cout
    return s


def genforce_state(
    resolution: int, z_dim: int, w_dim: int, n_mapping: int, channels: dict[int, int], seed: int = 0
) -> dict:
    """A genforce ``StyleGAN2Generator`` state dict (skip architecture, unconditional), random values."""
    g = torch.Generator().manual_seed(seed)
    s: dict[str, torch.Tensor] = {}
    for i in range(n_mapping):
        s[f"mapping.dense{i}.weight"] = _rand(g, w_dim, z_dim if i == 0 else w_dim, scale=100.0)
        s[f"mapping.dense{i}.bias"] = _rand(g, w_dim, scale=10.0)
    s["truncation.w_avg"] = _rand(g, w_dim, scale=0.5)
    s["synthesis.early_layer.const"] = _rand(g, 1, channels[4], 4, 4)
    log_res = int(math.log2(resolution))
    for b in range(log_res - 1):
        res = 4 * 2**b
        layers = (
            [(0, channels[4], channels[4])]
            if b == 0
            else [(2 * b - 1, channels[res // 2], channels[res]), (2 * b, channels[res], channels[res])]
        )
        for j, cin, cout in layers:
            p = f"synthesis.layer{j}"
            s[f"{p}.weight"] = _rand(g, cout, cin, 3, 3)
            s[f"{p}.bias"] = _rand(g, cout, scale=0.1)
            s[f"{p}.style.weight"] = _rand(g, cin, w_dim)
            s[f"{p}.style.bias"] = _rand(g, cin, scale=0.1)
            s[f"{p}.noise"] = _rand(g, 1, 1, res, res)
            s[f"{p}.noise_strength"] = _rand(g, scale=0.1)
            if j % 2 == 1:
                s[f"{p}.filter.kernel"] = fir_kernel(gain=4.0)[None, None]
        p = f"synthesis.output{b}"
        s[f"{p}.weight"] = _rand(g, 3, channels[res], 1, 1)
        s[f"{p}.bias"] = _rand(g, 3, scale=0.1)
        s[f"{p}.style.weight"] = _rand(g, channels[res], w_dim)
        s[f"{p}.style.bias"] = _rand(g, channels[res], scale=0.1)
    s["synthesis.upsample.kernel"] = fir_kernel(gain=4.0)[None, None]
    return s


SMALL = {4: 16, 8: 16, 16: 8, 32: 8}


def _save(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    torch.save(obj, p)
    return p


def test_upfirdn_matches_nearest_upsample_for_box_kernel():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    box = torch.ones(2, 2)
    y = upfirdn2d(x, box, up=2, pad=(1, 0))
    assert y.shape == (1, 1, 8, 8)
    assert torch.equal(y, x.repeat_interleave(2, -1).repeat_interleave(2, -2))


def test_rosinality_small_loads_strictly_and_runs(tmp_path):
    state = rosinality_state(32, 24, 3, SMALL, seed=1)
    latent_avg = torch.randn(24) * 0.3
    path = _save(tmp_path, "g.pt", {"g_ema": state, "latent_avg": latent_avg, "g": state, "d": {}})
    gen = load_rosinality(path, {"resolution": 32})
    assert isinstance(gen, Generator) and isinstance(gen, StyleGAN2Generator)
    assert (gen.resolution, gen.z_dim, gen.w_dim, gen.n_latent, gen.alignment) == (32, 24, 24, 8, "ffhq")
    assert torch.equal(gen.w_avg, latent_avg)
    assert not any(p.requires_grad for p in gen.parameters()) and not gen.training
    z = torch.randn(3, 24, generator=torch.Generator().manual_seed(0))
    w = gen.mapping(z)
    assert w.shape == (3, 24) and torch.isfinite(w).all()
    wplus = gen.truncate(w, 0.7)[:, None].expand(-1, gen.n_latent, -1)
    img = gen.synthesis(wplus)
    assert img.shape == (3, 3, 32, 32) and torch.isfinite(img).all() and img.std() > 1e-3
    # fixed noise: deterministic; explicit noise changes the image; samples differ from each other
    assert torch.equal(img, gen.synthesis(wplus))
    other = gen.synthesis(wplus, noise=[torch.zeros_like(c.noise) for c in gen.synthesis_net.convs])
    assert not torch.allclose(img, other)
    assert not torch.allclose(img[0], img[1])
    # gradients flow to W+ with frozen weights
    wp = wplus.clone().requires_grad_(True)
    gen.synthesis(wp).square().mean().backward()
    assert wp.grad is not None and wp.grad.abs().sum() > 0


def test_truncation_is_linear_toward_w_avg(tmp_path):
    path = _save(tmp_path, "g.pt", {"g_ema": rosinality_state(16, 16, 2, SMALL), "latent_avg": torch.ones(16)})
    gen = load_rosinality(path, {})
    w = torch.randn(2, 16)
    assert torch.allclose(gen.truncate(w, 0.0), torch.ones(2, 16))
    assert torch.allclose(gen.truncate(w, 1.0), w)
    assert torch.allclose(gen.truncate(w, 0.5), 0.5 * (w + 1))


def test_rosinality_without_latent_avg_estimates_it(tmp_path):
    path = _save(tmp_path, "g.pt", {"g_ema": rosinality_state(16, 16, 2, SMALL)})
    gen = load_rosinality(path, {"w_avg_samples": 500})
    z = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gen.w_avg, gen.mapping(z).mean(0), atol=1e-4)


def test_rosinality_inside_e4e_checkpoint(tmp_path):
    state = {f"decoder.{k}": v for k, v in rosinality_state(16, 16, 2, SMALL).items()}
    state["encoder.x"] = torch.zeros(1)
    path = _save(tmp_path, "e4e.pt", {"state_dict": state, "latent_avg": torch.ones(6, 16) * 0.25, "opts": {}})
    gen = load_rosinality(path, {"state_key": "state_dict", "prefix": "decoder."})
    assert gen.resolution == 16 and torch.allclose(gen.w_avg, torch.full((16,), 0.25))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.pop("conv1.noise.weight"),
        lambda s: s.__setitem__("convs.1.activate.biasX", s.pop("convs.1.activate.bias")),
        lambda s: s.__setitem__("style.2.weight", torch.zeros(16, 8)),
        lambda s: s.pop("convs.0.conv.blur.kernel"),
        lambda s: s.__setitem__("to_rgbs.0.upsample.kernel", torch.ones(4, 4)),
        lambda s: s.__setitem__("extra.weight", torch.zeros(1)),
    ],
    ids=["missing", "renamed", "wrong-shape", "missing-kernel", "bad-kernel", "unexpected"],
)
def test_rosinality_layout_errors(tmp_path, mutate):
    state = rosinality_state(16, 16, 2, SMALL)
    mutate(state)
    path = _save(tmp_path, "broken.pt", {"g_ema": state, "latent_avg": torch.zeros(16)})
    with pytest.raises(CheckpointLayoutError, match="broken.pt"):
        load_rosinality(path, {})


def test_rosinality_wrong_top_level_and_resolution(tmp_path):
    state = rosinality_state(16, 16, 2, SMALL)
    with pytest.raises(CheckpointLayoutError, match="g_ema"):
        load_rosinality(_save(tmp_path, "a.pt", {"generator": state}), {})
    with pytest.raises(CheckpointLayoutError, match="16 px"):
        load_rosinality(_save(tmp_path, "b.pt", {"g_ema": state, "latent_avg": torch.zeros(16)}), {"resolution": 1024})


def test_genforce_small_loads_strictly_and_prefers_ema(tmp_path):
    ema = genforce_state(32, 16, 24, 2, SMALL, seed=2)
    raw = genforce_state(32, 16, 24, 2, SMALL, seed=3)
    path = _save(tmp_path, "gf.pth", {"generator": raw, "discriminator": {}, "generator_smooth": ema})
    gen = load_genforce(path, {})
    assert (gen.resolution, gen.z_dim, gen.w_dim, gen.n_latent) == (32, 16, 24, 8)
    assert torch.equal(gen.w_avg, ema["truncation.w_avg"])
    img = gen.synthesis(gen.mapping(torch.randn(2, 16))[:, None].expand(-1, 8, -1))
    assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()
    only_raw = load_genforce(_save(tmp_path, "raw.pth", {"generator": raw}), {})
    assert torch.equal(only_raw.w_avg, raw["truncation.w_avg"])


def test_genforce_and_rosinality_agree_on_converted_weights(tmp_path):
    """Converting genforce -> rosinality the way rosinality's convert script treats TF weights gives one network."""
    gf = genforce_state(16, 16, 16, 2, SMALL, seed=4)
    ro: dict[str, torch.Tensor] = {}
    for i in range(2):
        ro[f"style.{i + 1}.weight"] = gf[f"mapping.dense{i}.weight"]
        ro[f"style.{i + 1}.bias"] = gf[f"mapping.dense{i}.bias"]
    ro["input.input"] = gf["synthesis.early_layer.const"]
    names = ["conv1", "convs.0", "convs.1", "convs.2", "convs.3"]
    for j, name in enumerate(names):
        p = f"synthesis.layer{j}"
        w = gf[f"{p}.weight"][None]
        ro[f"{name}.conv.weight"] = w.flip(3, 4) if j % 2 == 1 else w
        if j % 2 == 1:
            ro[f"{name}.conv.blur.kernel"] = fir_kernel(gain=4.0)
        ro[f"{name}.conv.modulation.weight"] = gf[f"{p}.style.weight"]
        ro[f"{name}.conv.modulation.bias"] = gf[f"{p}.style.bias"] + 1
        ro[f"{name}.noise.weight"] = gf[f"{p}.noise_strength"].reshape(1)
        ro[f"{name}.activate.bias"] = gf[f"{p}.bias"]
        ro[f"noises.noise_{j}"] = gf[f"{p}.noise"]
    for k, name in enumerate(["to_rgb1", "to_rgbs.0", "to_rgbs.1"]):
        p = f"synthesis.output{k}"
        ro[f"{name}.conv.weight"] = gf[f"{p}.weight"][None]
        ro[f"{name}.conv.modulation.weight"] = gf[f"{p}.style.weight"]
        ro[f"{name}.conv.modulation.bias"] = gf[f"{p}.style.bias"] + 1
        ro[f"{name}.bias"] = gf[f"{p}.bias"].reshape(1, 3, 1, 1)
        if k:
            ro[f"{name}.upsample.kernel"] = fir_kernel(gain=4.0)
    a = load_genforce(_save(tmp_path, "gf.pth", {"generator_smooth": gf}), {})
    b = load_rosinality(_save(tmp_path, "ro.pt", {"g_ema": ro, "latent_avg": gf["truncation.w_avg"]}), {})
    wplus = torch.randn(2, 6, 16)
    assert torch.allclose(a.synthesis(wplus), b.synthesis(wplus), atol=1e-5)
    z = torch.randn(2, 16)
    assert torch.allclose(a.mapping(z), b.mapping(z), atol=1e-5)


def test_genforce_layout_errors(tmp_path):
    state = genforce_state(16, 16, 16, 2, SMALL)
    state["mapping.label_weight"] = torch.zeros(3, 16)  # conditional generator: not supported
    with pytest.raises(CheckpointLayoutError, match="label_weight"):
        load_genforce(_save(tmp_path, "cond.pth", {"generator": state}), {})
    state = genforce_state(16, 16, 16, 2, SMALL)
    state.pop("synthesis.layer2.noise")
    with pytest.raises(CheckpointLayoutError, match="noise"):
        load_genforce(_save(tmp_path, "nonoise.pth", {"generator": state}), {})


def test_1024_layout_has_18_latents():
    gen = StyleGAN2Generator(1024, channels={4 * 2**i: 4 for i in range(9)})
    assert gen.n_latent == 18 and len(gen.synthesis_net.convs) == 17 and len(gen.synthesis_net.to_rgbs) == 9


def _golden(name: str) -> dict:
    path = GOLDEN / name
    if not path.is_file():
        pytest.skip(f"golden fixture {name} not present")
    return torch.load(path, weights_only=True)


def test_golden_rosinality_reference(tmp_path):
    gold = _golden("stylegan2_rosinality.pt")
    cfg = gold["config"]
    state = rosinality_state(int(cfg[0]), int(cfg[1]), int(cfg[2]), {4: 512, 8: 512, 16: 512}, seed=int(cfg[3]))
    gen = load_rosinality(_save(tmp_path, "g.pt", {"g_ema": state, "latent_avg": gold["latent_avg"]}), {})
    assert torch.allclose(gen.mapping(gold["z"]), gold["w"], atol=1e-4, rtol=1e-4)
    img = gen.synthesis(gold["wplus"])
    assert (img - gold["image"]).abs().max() < 1e-4


def test_golden_genforce_reference(tmp_path):
    gold = _golden("stylegan2_genforce.pt")
    cfg = [int(v) for v in gold["config"]]
    res, z_dim, w_dim, n_map, seed = cfg
    from worker.models.stylegan2 import default_channels

    state = genforce_state(res, z_dim, w_dim, n_map, default_channels(res, 256, 32), seed=seed)
    gen = load_genforce(_save(tmp_path, "gf.pth", {"generator_smooth": state}), {})
    assert torch.allclose(gen.mapping(gold["z"]), gold["w"], atol=1e-4, rtol=1e-4)
    assert (gen.synthesis(gold["wplus"]) - gold["image"]).abs().max() < 1e-4


@pytest.mark.slow
def test_full_size_ffhq1024_layouts(tmp_path):
    """Production shapes: 1024 px, 512-D, 8 mapping layers, config-F widths, 18 W+ rows (about 30 s on one CPU)."""
    from worker.models.stylegan2 import default_channels

    chans = default_channels(1024)
    gen = load_rosinality(
        _save(tmp_path, "ffhq.pt", {"g_ema": rosinality_state(1024, 512, 8, chans), "latent_avg": torch.zeros(512)}),
        {"resolution": 1024},
    )
    assert (gen.n_latent, gen.w_dim, gen.z_dim) == (18, 512, 512)
    assert sum(p.numel() for p in gen.parameters()) > 30_000_000
    with torch.no_grad():
        img = gen.synthesis(gen.mapping(torch.randn(1, 512))[:, None].expand(-1, 18, -1))
    assert img.shape == (1, 3, 1024, 1024) and torch.isfinite(img).all()
    gf = load_genforce(_save(tmp_path, "gf.pth", {"generator_smooth": genforce_state(1024, 512, 512, 8, chans)}), {})
    assert gf.n_latent == 18 and gf.resolution == 1024
