"""The fine-tune delta of the DCGAN generator: pinned by SHA-256 in the manifest, applied at load, off when disabled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from worker.errors import BundleError, CheckpointLayoutError, HashMismatchError
from worker.models.bundle import load_bundle, sha256_file, write_manifest
from worker.models.dcgan import DELTA_FORMAT, DCGANGenerator, apply_delta

torch.set_num_threads(1)
CFG = {"z_dim": 8, "ngf": 4}


def _write_base(d: Path) -> DCGANGenerator:
    torch.manual_seed(5)
    ref = DCGANGenerator(nz=8, ngf=4)
    torch.save({"netG_state_dict": ref.state_dict()}, d / "weights.tar")
    return ref.eval()


def _delta(base: DCGANGenerator, base_sha: str, keys: tuple[str, ...] = ("main.3.weight", "main.4.bias")) -> dict:
    g = torch.Generator().manual_seed(9)
    diffs = {k: (0.01 * torch.randn(base.state_dict()[k].shape, generator=g)).half() for k in keys}
    return {"format": DELTA_FORMAT, "version": 1, "base_sha256": base_sha, "delta": diffs, "meta": {"step": 1}}


def _bundle(tmp_path: Path, enabled: bool = True) -> tuple[Path, DCGANGenerator, dict]:
    ref = _write_base(tmp_path)
    delta = _delta(ref, sha256_file(tmp_path / "weights.tar"))
    torch.save(delta, tmp_path / "delta.pt")
    config = {**CFG, "delta": {"path": "delta.pt", "sha256": "FILL_IN", "enabled": enabled}}
    write_manifest(
        tmp_path, {"generator": {"format": "dcgan-gan-face-generate", "path": "weights.tar", "config": config}}, "tiny"
    )
    return tmp_path, ref, delta


def test_enabled_delta_is_applied_and_changes_the_bundle_id(tmp_path: Path) -> None:
    d, ref, delta = _bundle(tmp_path)
    b = load_bundle(d, components=["generator"])
    sha = sha256_file(d / "delta.pt")
    assert b.bundle_id == f"tiny+generator-delta-{sha[:12]}"
    assert b.hashes["generator.delta"] == sha
    got, want = b.generator.state_dict(), ref.state_dict()
    for k in want:
        if k in delta["delta"]:
            assert torch.allclose(got[k], want[k] + delta["delta"][k].float())
            assert not torch.equal(got[k], want[k])
        else:
            assert torch.equal(got[k], want[k])
    z = torch.randn(2, 8)
    assert not torch.allclose(b.generator(z), ref(z))


def test_disabled_delta_is_ignored(tmp_path: Path) -> None:
    d, ref, _ = _bundle(tmp_path, enabled=False)
    (d / "delta.pt").write_bytes(b"not read")  # a disabled delta is neither hashed nor read
    b = load_bundle(d, components=["generator"])
    assert b.bundle_id == "tiny" and "generator.delta" not in b.hashes
    z = torch.randn(2, 8)
    assert torch.equal(b.generator(z), ref(z))


def test_tampered_delta_is_refused_before_loading(tmp_path: Path) -> None:
    d, ref, delta = _bundle(tmp_path)
    delta["delta"]["main.3.weight"] = delta["delta"]["main.3.weight"] * 2
    torch.save(delta, d / "delta.pt")
    with pytest.raises(HashMismatchError, match="delta"):
        load_bundle(d, components=["generator"])


def test_delta_for_another_base_or_shape_is_a_layout_error(tmp_path: Path) -> None:
    ref = _write_base(tmp_path)
    state = ref.state_dict()
    sha = sha256_file(tmp_path / "weights.tar")
    torch.save(_delta(ref, "0" * 64), tmp_path / "other.pt")
    with pytest.raises(CheckpointLayoutError, match="another base"):
        apply_delta(state, tmp_path / "other.pt", sha)
    bad = _delta(ref, sha)
    bad["delta"]["main.3.weight"] = torch.zeros(3, 3).half()
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(CheckpointLayoutError, match="does not fit"):
        apply_delta(state, tmp_path / "shape.pt", sha)
    bad = _delta(ref, sha)
    bad["delta"]["main.99.weight"] = torch.zeros(1).half()
    torch.save(bad, tmp_path / "name.pt")
    with pytest.raises(CheckpointLayoutError, match="does not fit"):
        apply_delta(state, tmp_path / "name.pt", sha)
    torch.save({"format": "other"}, tmp_path / "fmt.pt")
    with pytest.raises(CheckpointLayoutError, match="not a dcgan-delta"):
        apply_delta(state, tmp_path / "fmt.pt", sha)


def test_malformed_delta_entry_is_a_bundle_error(tmp_path: Path) -> None:
    d, _, _ = _bundle(tmp_path)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["components"]["generator"]["config"]["delta"] = {"path": "delta.pt"}
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="delta"):
        load_bundle(d, components=["generator"])
    manifest["components"]["generator"]["config"]["delta"] = {"path": "delta.pt", "sha256": "0" * 64, "enabled": "yes"}
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="enabled"):
        load_bundle(d, components=["generator"])
    manifest["components"]["generator"]["config"]["delta"]["enabled"] = True
    manifest["components"]["generator"]["format"] = "keymap-mlp"  # a loader that would ignore it
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="takes no delta"):
        load_bundle(d, components=["generator"])
