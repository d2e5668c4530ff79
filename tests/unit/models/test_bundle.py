"""Bundle manifests: SHA-256 pinning before any unpickling, format dispatch, errors, the production template."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from test_layout_arcface import arcface_state
from test_layout_e4e import e4e_checkpoint
from test_layout_farl import farl_checkpoint
from test_layout_stylegan2 import rosinality_state

from worker.errors import BundleError, CheckpointLayoutError, HashMismatchError, UnknownComponentError
from worker.models import bundle as bundle_mod
from worker.models.arcface import ArcFaceIRSE50
from worker.models.bundle import (
    ModelBundle,
    load_bundle,
    manifest_for,
    read_manifest,
    resolve_path,
    sha256_file,
    validate_manifest,
    write_manifest,
)
from worker.models.e4e import E4EEncoder
from worker.models.farl import FaRLVisual
from worker.models.stylegan2 import StyleGAN2Generator

REPO = Path(__file__).resolve().parents[3]
torch.set_num_threads(1)
CHANS = {4: 8, 8: 8, 16: 8, 32: 8}


def _components() -> dict:
    return {
        "generator": {"format": "stylegan2-rosinality", "path": "g.pt", "config": {"resolution": 32}},
        "encoder": {"format": "e4e", "path": "weights/e4e.pt"},
        "identity": {"format": "arcface-irse50", "path": "ir_se50.pth"},
        "attribute": {"format": "farl-vitb16", "path": "farl.pth"},
    }


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bundle")
    (d / "weights").mkdir()
    torch.save({"g_ema": rosinality_state(32, 128, 2, CHANS), "latent_avg": torch.zeros(128)}, d / "g.pt")
    torch.save(e4e_checkpoint(), d / "weights" / "e4e.pt")
    torch.save(arcface_state(), d / "ir_se50.pth")
    torch.save(farl_checkpoint(), d / "farl.pth")
    write_manifest(d, _components(), bundle_id="small-prod-layout")
    return d


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_write_manifest_and_load_bundle(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["bundle_id"] == "small-prod-layout"
    digest = hashlib.sha256((bundle_dir / "weights" / "e4e.pt").read_bytes()).hexdigest()
    assert manifest["components"]["encoder"]["sha256"] == digest
    b = load_bundle(bundle_dir, "cpu")
    assert isinstance(b, ModelBundle) and b.bundle_id == "small-prod-layout" and b.sampler is None
    assert isinstance(b.generator, StyleGAN2Generator) and isinstance(b.encoder, E4EEncoder)
    assert isinstance(b.identity, ArcFaceIRSE50) and isinstance(b.attribute, FaRLVisual)
    assert b.hashes == {k: v["sha256"] for k, v in manifest["components"].items()}
    for m in (b.generator, b.encoder, b.identity, b.attribute):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    # the pieces fit together: encode -> W+ of the generator's shape -> image -> identity / attribute features
    wplus = b.encoder(torch.zeros(1, 3, 256, 256))
    assert wplus.shape == (1, b.generator.n_latent, b.generator.w_dim)
    img = b.generator.synthesis(wplus)
    assert b.identity.embed(img, b.generator.alignment).shape == (1, 32)
    assert b.attribute.tokens(img, b.generator.alignment).shape == (1, 197, 128)


def test_component_subset(bundle_dir):
    b = load_bundle(bundle_dir, "cpu", components=["identity"])
    assert b.generator is None and b.encoder is None and isinstance(b.identity, ArcFaceIRSE50)
    assert list(b.hashes) == ["identity"]


def test_hash_mismatch_is_caught_before_any_loader_runs(bundle_dir, tmp_path, monkeypatch):
    d = _copy(bundle_dir, tmp_path / "b")
    farl = d / "farl.pth"  # the last component loaded: a loader for an earlier one must not have run
    data = bytearray(farl.read_bytes())
    data[-10] ^= 0xFF
    farl.write_bytes(bytes(data))
    calls = []
    monkeypatch.setattr(bundle_mod, "loader_for", lambda fmt: calls.append(fmt))
    with pytest.raises(HashMismatchError, match="farl.pth") as exc:
        load_bundle(d, "cpu")
    assert calls == []
    assert exc.value.code == "hash_mismatch"


def test_truncated_checkpoint_with_matching_hash_is_a_layout_error(bundle_dir, tmp_path):
    d = _copy(bundle_dir, tmp_path / "b")
    (d / "ir_se50.pth").write_bytes((d / "ir_se50.pth").read_bytes()[:1000])
    write_manifest(d)  # re-pin the (now truncated) file
    with pytest.raises(CheckpointLayoutError, match="ir_se50.pth"):
        load_bundle(d, "cpu", components=["identity"])


def test_missing_file_names_the_path(bundle_dir, tmp_path):
    d = _copy(bundle_dir, tmp_path / "b")
    (d / "weights" / "e4e.pt").unlink()
    with pytest.raises(BundleError, match=r"weights/e4e\.pt"):
        load_bundle(d, "cpu")


def _edit(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "edit,error,match",
    [
        (
            lambda m: m["components"].__setitem__("vocoder", m["components"]["identity"]),
            UnknownComponentError,
            "vocoder",
        ),
        (
            lambda m: m["components"]["identity"].__setitem__("format", "arcface-r100"),
            UnknownComponentError,
            "arcface-r100",
        ),
        (lambda m: m["components"]["identity"].__setitem__("sha256", "FILL_IN"), BundleError, "FILL_IN"),
        (lambda m: m["components"]["identity"].__setitem__("sha256", "abc"), BundleError, "64 hex"),
        (lambda m: m.__setitem__("schema_version", 2), BundleError, "schema_version"),
        (lambda m: m["components"].pop("encoder"), BundleError, "encoder"),
        (
            lambda m: m["components"]["identity"].__setitem__("path", "s3://bucket/ir_se50.pth"),
            BundleError,
            "worker.storage",
        ),
        (lambda m: m["components"]["generator"].__setitem__("format", "arcface-irse50"), BundleError, "Generator"),
    ],
    ids=[
        "unknown-component",
        "unknown-format",
        "placeholder",
        "bad-hex",
        "schema",
        "missing-required",
        "s3",
        "wrong-role",
    ],
)
def test_manifest_errors(bundle_dir, tmp_path, edit, error, match):
    d = _copy(bundle_dir, tmp_path / "b")
    _edit(d, edit)
    if match == "Generator":  # the identity file under the generator role: hash it so only the role check fails
        _edit(
            d, lambda m: m["components"]["generator"].update(path="ir_se50.pth", sha256=sha256_file(d / "ir_se50.pth"))
        )
    with pytest.raises(error, match=match):
        load_bundle(d, "cpu")


def test_unknown_component_in_selection(bundle_dir):
    with pytest.raises(UnknownComponentError):
        load_bundle(bundle_dir, "cpu", components=["identity", "lpips"])
    with pytest.raises(BundleError, match="sampler"):
        load_bundle(bundle_dir, "cpu", components=["sampler"])


def test_missing_manifest(tmp_path):
    with pytest.raises(BundleError, match="manifest"):
        load_bundle(tmp_path, "cpu")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="JSON"):
        read_manifest(tmp_path)


def test_pkg_paths_resolve_inside_installed_packages(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "shippedweights"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    torch.save(arcface_state(), pkg / "id.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sys.modules.pop("shippedweights", None)
    d = tmp_path / "bundle"
    d.mkdir()
    comps = {"identity": {"format": "arcface-irse50", "path": "pkg://shippedweights/id.pth"}}
    write_manifest(d, comps, bundle_id="pkg-test")
    assert resolve_path(d, "pkg://shippedweights/id.pth") == pkg / "id.pth"
    b = load_bundle(d, "cpu", components=["identity"])
    assert b.hashes["identity"] == sha256_file(pkg / "id.pth")
    with pytest.raises(BundleError, match="not installed"):
        resolve_path(d, "pkg://no_such_package_xyz/a.pt")


def test_sha256_reads_in_chunks(tmp_path):
    p = tmp_path / "big.bin"
    data = bytes(range(256)) * (40 * 1024 + 7)  # > one 8 MiB chunk
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_other_formats_are_imported_lazily_by_name(monkeypatch):
    assert bundle_mod.FORMATS["lite-generator"] == "worker.models.lite:load_lite_generator"
    assert bundle_mod.FORMATS["lite-encoder"] == "worker.models.lite:load_lite_encoder"
    assert bundle_mod.FORMATS["dlib-resnet"] == "worker.models.dlib_resnet:load_dlib_resnet"
    from worker.models import lite

    assert bundle_mod.loader_for("lite-generator") is lite.load_lite_generator
    monkeypatch.setitem(bundle_mod.FORMATS, "not-installed", "worker.models.no_such_module:load")
    with pytest.raises(UnknownComponentError, match="not-installed"):
        bundle_mod.loader_for("not-installed")
    with pytest.raises(UnknownComponentError):
        bundle_mod.loader_for("no-such-format")


def test_production_manifest_template_is_valid_and_refuses_to_load(tmp_path):
    tpl = REPO / "infra" / "bundles" / "production.manifest.json"
    manifest = json.loads(tpl.read_text())
    validate_manifest(manifest)
    comps = manifest["components"]
    assert {c["format"] for c in comps.values()} >= {"e4e", "arcface-irse50", "farl-vitb16"}
    assert comps["generator"]["format"] in ("stylegan2-rosinality", "stylegan2-genforce")
    assert comps["generator"]["config"].get("resolution") == 1024
    assert all(c["sha256"] == "FILL_IN" for c in comps.values())
    d = tmp_path / "prod"
    d.mkdir()
    (d / "manifest.json").write_text(tpl.read_text())
    with pytest.raises(BundleError, match="FILL_IN"):
        load_bundle(d, "cpu")
    # filling in: put files where the paths say, then re-hash the template in place
    for c in comps.values():
        p = resolve_path(d, c["path"])
        if not p.is_absolute() or str(p).startswith(str(d)):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
    filled = manifest_for(d)
    assert all(len(c["sha256"]) == 64 for c in filled["components"].values())
    assert filled["bundle_id"] == manifest["bundle_id"]


def test_rehash_keeps_the_engine_advice_and_calibration(bundle_dir: Path, tmp_path: Path) -> None:
    """``cancelable-bundle rehash`` after replacing a weight file: new hashes, the threshold and advice kept."""
    import shutil

    from worker.bundletool.cli import main

    bundle_dir = Path(shutil.copytree(bundle_dir, tmp_path / "b"))
    mpath = bundle_dir / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["engine"] = {"verify_threshold": 0.91, "split": "readme"}
    manifest["calibration"] = {"verify_threshold": {"tool": "cancelable-bundle calibrate-threshold"}}
    mpath.write_text(json.dumps(manifest))
    name, spec = next(iter(manifest["components"].items()))
    target = resolve_path(bundle_dir, spec["path"])
    target.write_bytes(target.read_bytes() + b"\0")  # a replaced weight file: the old hash no longer matches
    assert main(["rehash", str(bundle_dir)]) == 0
    after = json.loads(mpath.read_text())
    assert after["engine"] == manifest["engine"] and after["calibration"] == manifest["calibration"]
    assert after["components"][name]["sha256"] != spec["sha256"]
    assert after["components"][name]["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
