"""The torch port of dlib's face recognition ResNet against dlib itself (worker.models.dlib_resnet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worker.errors import CheckpointLayoutError, InvalidTensorError
from worker.models import dlib_face, dlib_resnet
from worker.models.base import IdentityModel

torch.set_num_threads(1)

N_LFW = 10


@pytest.fixture(scope="module")
def model() -> dlib_resnet.DlibResNet:
    return dlib_resnet.load_dlib_resnet()


@pytest.fixture(scope="module")
def dlib_rec():
    import dlib

    return dlib.face_recognition_model_v1(str(dlib_resnet.default_model_path()))


@pytest.fixture(scope="module")
def faces(shared_dir: Path) -> dict[str, tuple[np.ndarray, dlib_face.DetectedFace]]:
    """Smoke photos and N_LFW LFW-dev images (first image of every 500th identity): name -> (rgb, face)."""
    from PIL import Image

    paths = sorted((shared_dir / "data" / "faces-smoke" / "obama-biden").glob("*.jpg"))
    people = sorted(p for p in (shared_dir / "data" / "lfw-dev").iterdir() if p.is_dir())
    paths += [sorted(p.glob("*.jpg"))[0] for p in people[::500][:N_LFW]]
    out = {}
    for p in paths:
        rgb = np.asarray(Image.open(p).convert("RGB"))
        found = dlib_face.detect_faces(rgb)
        assert found, f"no face in {p.name}"
        out[p.stem] = (rgb, found[0])
    assert len(out) == 4 + N_LFW
    return out


def _to_tensor(chips: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()


def test_parser_reads_the_whole_file_into_the_expected_layers():
    net = dlib_resnet.parse_dlib_net(dlib_resnet.default_model_path().read_bytes())
    kinds = [layer.kind for layer in net.layers]
    assert net.loss == "loss_metric_2" and net.input_size == (150, 150)
    assert kinds.count("con") == 29 and kinds.count("affine") == 29 and kinds.count("fc") == 1
    np.testing.assert_allclose(net.input_mean_rgb, (122.782, 117.001, 104.298), atol=1e-3)
    assert kinds == [kind for kind, _ in dlib_resnet._expected_layers()]


def test_port_matches_dlib_on_real_faces(model, dlib_rec, faces):
    chips, refs = [], []
    for rgb, face in faces.values():
        chip = dlib_face.face_chip(rgb, face, size=150, padding=0.25)
        ref_chip = np.array(dlib_rec.compute_face_descriptor(chip))
        # dlib's own image + landmarks path cuts the same chip
        ref_img = np.array(dlib_rec.compute_face_descriptor(rgb, dlib_face._full_object_detection(face)))
        np.testing.assert_allclose(ref_img, ref_chip, atol=1e-6)
        chips.append(chip)
        refs.append(ref_chip)
    with torch.no_grad():
        ours = model(_to_tensor(chips)).numpy()
    refs_arr = np.stack(refs)
    max_diff = np.abs(ours - refs_arr).max()
    assert max_diff <= 1e-4, f"max abs diff {max_diff:.3g}"
    # batch size does not change the result
    with torch.no_grad():
        single = model(_to_tensor(chips[:1])).numpy()
    assert np.abs(single[0] - ours[0]).max() <= 1e-5


def test_port_separates_identities_like_dlib(model, faces):
    chips = {name: dlib_face.face_chip(*faces[name]) for name in ("obama", "obama2", "obama3", "biden")}
    with torch.no_grad():
        emb = dict(zip(chips, model(_to_tensor(list(chips.values()))).numpy(), strict=True))
    # dlib's documented same-person threshold: Euclidean distance 0.6 between raw descriptors
    for other in ("obama2", "obama3"):
        assert np.linalg.norm(emb["obama"] - emb[other]) < 0.6
        assert np.linalg.norm(emb["biden"] - emb[other]) > 0.6


@pytest.mark.parametrize(
    ("convention", "size"), [("dlib-chip", 150), ("dlib-chip", 64), ("ffhq", 256), ("arcface-112", 112)]
)
def test_embed_accepts_every_convention(model, dlib_rec, faces, convention, size):
    cosines = []
    for rgb, face in list(faces.values())[:6]:
        ref = np.array(dlib_rec.compute_face_descriptor(dlib_face.face_chip(rgb, face)))
        crop = dlib_face.align_face(rgb, face, size, convention)
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        with torch.no_grad():
            e = model.embed(x, convention)[0].numpy()
        assert abs(np.linalg.norm(e) - 1.0) < 1e-5
        cosines.append(float(e @ ref / np.linalg.norm(ref)))
    # dlib-chip 150 is the very input of dlib; other crops lose a little to resampling and borders
    assert min(cosines) > (0.99999 if (convention, size) == ("dlib-chip", 150) else 0.97)


def test_embed_is_differentiable_and_the_model_frozen(model):
    assert isinstance(model, IdentityModel) and model.embedding_dim == 128
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = (torch.rand(2, 3, 128, 128) * 2 - 1).requires_grad_(True)
    e = model.embed(x, "ffhq")
    assert e.shape == (2, 128)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))
    (e[0] @ e[1]).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bad_inputs_are_rejected(model):
    with pytest.raises(InvalidTensorError):
        model(torch.zeros(1, 3, 112, 112))
    with pytest.raises(InvalidTensorError):
        model.embed(torch.zeros(3, 150, 150), "dlib-chip")
    with pytest.raises(ValueError):
        model.embed(torch.zeros(1, 3, 150, 150), "no-such-crop")


def test_layout_errors_name_the_file(tmp_path):
    data = dlib_resnet.default_model_path().read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointLayoutError, match="truncated.dat"):
        dlib_resnet.load_dlib_resnet(truncated)
    trailing = tmp_path / "trailing.dat"
    trailing.write_bytes(data + b"\x00")
    with pytest.raises(CheckpointLayoutError, match="trailing.dat: 1 trailing"):
        dlib_resnet.load_dlib_resnet(trailing)
    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(b"PK\x03\x04 definitely not dlib")
    with pytest.raises(CheckpointLayoutError, match="garbage.dat"):
        dlib_resnet.load_dlib_resnet(garbage)
    with pytest.raises(CheckpointLayoutError, match="missing.dat"):
        dlib_resnet.load_dlib_resnet(tmp_path / "missing.dat")


def test_another_dlib_network_is_a_layout_error():
    # dlib's CNN face detector is a valid dlib network file, but not this network
    other = dlib_resnet.default_model_path().with_name("mmod_human_face_detector.dat")
    with pytest.raises(CheckpointLayoutError, match="mmod_human_face_detector.dat"):
        dlib_resnet.load_dlib_resnet(other)


def test_architecture_mismatch_is_detected():
    net = dlib_resnet.parse_dlib_net(dlib_resnet.default_model_path().read_bytes())
    dlib_resnet._check_layout(net, "ok.dat")
    net.layers[5].attrs["num_filters"] = 48
    with pytest.raises(CheckpointLayoutError, match="bad.dat: layer 5"):
        dlib_resnet._check_layout(net, "bad.dat")
    del net.layers[7]
    with pytest.raises(CheckpointLayoutError, match="129 layers"):
        dlib_resnet._check_layout(net, "bad.dat")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_port_on_cuda_matches_cpu(model):
    x = torch.rand(4, 3, 150, 150) * 255
    with torch.no_grad():
        cpu = model(x)
        gpu = dlib_resnet.load_dlib_resnet(config={"device": "cuda"})(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=0)
