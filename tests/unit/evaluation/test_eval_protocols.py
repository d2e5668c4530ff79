"""Protocols, shard/merge and the report end to end on the tiny random engine, with a stand-in judge.

The tiny models make meaningless 16 px "faces", so the independent evaluator cannot judge them; a stand-in judge
(seeded random projection of the pixels) checks the bookkeeping: which images are compared with which, sharding,
merging, the report's schema and files. The real judge is tested on real photos in test_evaluator.py.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import RES, person_faces, tiny_bundle

from worker.algorithm.config import EngineConfig
from worker.algorithm.pipeline import Engine
from worker.evaluation import protocols as P
from worker.evaluation.cli import build_parser
from worker.evaluation.report import SCHEMA_VERSION, build_report, figures, markdown, write_report

torch.set_num_threads(1)


class PixelEngine(Engine):
    """The real engine on tiny models; ``prepare`` resizes instead of detecting (tiny faces are not faces)."""

    def prepare(self, image_rgb_uint8: np.ndarray) -> torch.Tensor:
        img = Image.fromarray(image_rgb_uint8).resize((RES, RES), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class PixelJudge:
    embedding_dim = 24

    def __init__(self):
        self.proj = np.random.default_rng(0).normal(size=(16 * 16 * 3, self.embedding_dim))

    def embed_many(self, images):
        x = np.stack([np.asarray(Image.fromarray(i).resize((16, 16)), np.float32).ravel() / 255 - 0.5 for i in images])
        e = x @ self.proj
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        if len(images) > 2:  # one miss, to exercise failure-to-acquire bookkeeping
            e[1] = np.nan
        return e.astype(np.float32), np.isfinite(e).all(axis=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    for person in range(7):
        d = root / f"Person_{person}"
        d.mkdir()
        n = 2 if person % 2 == 0 else 1  # some identities get a synthetic second capture
        faces = person_faces(n, person, seed=1)
        for k in range(n):
            arr = ((faces[k].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
            Image.fromarray(arr).resize((64, 64), Image.BICUBIC).save(d / f"Person_{person}_{k + 1:04d}.jpg")
    rows = ["fold\tmated\tleft\tright"]
    rows += [f"0\t1\tPerson_{p}/Person_{p}_0001.jpg\tPerson_{p}/Person_{p}_0002.jpg" for p in (0, 2, 4)]
    rows += [f"0\t0\tPerson_{p}/Person_{p}_0001.jpg\tPerson_{p + 1}/Person_{p + 1}_0001.jpg" for p in (0, 1, 2)]
    (root / "pairs.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def engine():
    return PixelEngine(tiny_bundle(), EngineConfig(steps=3, max_batch_images=8), torch.device("cpu"))


def merged_engine_dim() -> int:
    return int(tiny_bundle().identity.embedding_dim)


def _cfg(dataset, **kw):
    base = dict(data_dir=str(dataset), pairs_file=str(dataset / "pairs.tsv"), split="all", identities=7, keys=3)
    base.update(attack_steps=2, chunk=3, examples=2, threshold_pool=5)
    base.update(kw)
    return P.RunConfig(**base)


def test_identity_split_rule_and_order(dataset):
    for name in ("AJ_Lamas", "AJ_Cook", "Zico"):
        digest = int(hashlib.sha256(name.encode()).hexdigest(), 16)
        assert P.is_validation_identity(name) == (digest % 10 == 0)
    ids = P.list_identities(dataset, "all")
    assert len(ids) == 7
    assert [len(p) >= 2 for _, p in ids] == sorted([len(p) >= 2 for _, p in ids], reverse=True)
    val = {n for n, _ in P.list_identities(dataset, "val")}
    train = {n for n, _ in P.list_identities(dataset, "train")}
    assert val | train == {n for n, _ in ids} and not val & train


def test_synthetic_capture_is_deterministic_and_different(dataset):
    img = np.asarray(Image.open(dataset / "Person_1" / "Person_1_0001.jpg").convert("RGB"))
    a, b = P.synthetic_capture(img, 5), P.synthetic_capture(img, 5)
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, img)


@pytest.fixture(scope="module")
def merged(dataset, engine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    logs: list[str] = []
    for i in range(2):
        cfg = _cfg(dataset, shard_index=i, shard_count=2)
        P.run_shard(engine, PixelJudge(), cfg, tmp / f"s{i}", b"k" * 32, logs.append)
    records, metas = P.load_shards([tmp / "s0", tmp / "s1"])
    scores = P.compute_scores(records, keys=3)
    rep = build_report(scores, metas, n_boot=20)
    return {"dir": tmp, "logs": logs, "records": records, "metas": metas, "scores": scores, "report": rep}


def test_shards_merge_into_one_report(merged, tmp_path):
    assert any("ETA" in line for line in merged["logs"])
    records, scores, rep = merged["records"], merged["scores"], merged["report"]
    assert sorted(records["names"].tolist()) == [f"Person_{p}" for p in range(7)]
    assert len(records["pairs_mated"]) == 6  # the pairs file's rows are split across shards, each once
    assert set(records["probe_source"].tolist()) == {"second-photo", "synthetic-capture"}
    assert records["emb_cancel_k3"].shape == (7, 24)
    with pytest.raises(ValueError):
        P.load_shards([merged["dir"] / "s0", merged["dir"] / "s0"])

    assert len(scores["unlinkability"]["mated"]) == 7 * 3  # 3 key pairs per identity
    assert len(records["pool_names"]) == 5 and scores["n_original_photos_for_impostors"] == 7
    assert len(scores["protection"]["vs_original_photo"]) == 7 * 3
    assert scores["failures_to_acquire"]["cancel_k1"] == 2  # the stand-in judge misses one image per call
    assert rep["schema_version"] == SCHEMA_VERSION
    assert set(rep["protocols"]) == {
        "original",
        "enrol_probe",
        "protection",
        "unlinkability",
        "revocation",
        "attack",
        "cancelable_thresholds",
        "product",
    }
    assert (
        records["eng_cancel_k1"].shape == (7, merged_engine_dim()) and np.isnan(records["eng_cancel2_k1"]).all()
    )  # <= 2 photos
    assert len(scores["different_people"]) == 7 * 6 // 2  # every unordered pair of identities (NaN: judge missed)
    assert len(scores["product"]["1"]["impostor_other_key"]) == 7 * 6 and "2" not in scores["product"]
    conv = rep["protocols"]["cancelable_thresholds"]
    assert [r["far"] for r in conv] == [1e-3, 1e-2] and not any(r["supported"] for r in conv)  # 11 pairs
    assert rep["protocols"]["product"] is None  # no shipped thresholds recorded in these shards
    assert 0.0 <= rep["protocols"]["unlinkability"]["d_sys"] <= 1.0
    assert not rep["thresholds"]["original_fmr_1e-3"]["supported"]  # a handful of pairs cannot support FMR 1e-3
    tars = rep["protocols"]["original"]["tar_at_far"]
    assert [t["supported"] for t in tars] == [False, False, False]
    json.dumps(rep)  # serialisable
    figs = figures(rep, scores, records)
    assert {"det.png", "unlinkability.png", "examples.png", "hist_attack.png"} <= set(figs)
    out = write_report(rep, figs, str(tmp_path / "report"))
    assert (tmp_path / "report" / "report.md").read_text() == markdown(rep)
    assert json.loads((tmp_path / "report" / "report.json").read_text())["schema_version"] == SCHEMA_VERSION
    assert Image.open(tmp_path / "report" / "examples.png").size[0] > 500
    assert out == str(tmp_path / "report")


def test_scores_compare_the_right_images():
    """compute_scores on hand-made embeddings: each protocol picks the documented pair of roles."""
    e = np.eye(4, dtype=np.float32)
    n = 3
    rec = {
        "names": np.array(["a", "b", "c"]),
        "probe_source": np.array(["second-photo", "synthetic-capture", "second-photo"]),
        "impostor_name": np.array(["b", "c", "a"]),
    }
    roles = ["orig_a", "orig_b", "chip_a", "recon", "probe_k1", "probe_k2", "impostor_k1", "attack_nokey", "attack_key"]
    for r in roles + ["cancel_k1", "cancel_k2", "cancel_k3"]:
        rec[f"emb_{r}"] = np.tile(e[0], (n, 1))
    rec["emb_orig_a"] = np.stack([e[0], e[1], e[2]])  # distinct persons: cross pairs score 0
    rec["emb_probe_k1"] = np.stack([e[0], e[3], e[0]])  # identity b's probe does not match its enrolment
    rec["emb_cancel_k2"] = np.tile(e[1], (n, 1))  # key 2 orthogonal to key 1
    s = P.compute_scores(rec, keys=3)
    # key 1: (cancel_k1, probe_k1) = 1, 0, 1; key 2 (cancel_k2 orthogonal to probe_k2): 0, 0, 0
    assert s["enrol_probe"]["genuine"].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert s["enrol_probe"]["genuine_second_photo"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert s["enrol_probe"]["impostor_same_key"].tolist() == [1.0, 1.0, 1.0]
    assert s["original"]["genuine"].tolist() == [1.0, 0.0]  # orig_a vs orig_b where a real second photo exists
    assert sorted(s["original"]["impostor"].tolist()) == [0.0, 0.0, 0.0]
    assert s["revocation"]["reissued_vs_revoked"].tolist() == [0.0, 0.0, 0.0]
    # mated pairs (k1,k2), (k1,k3), (k2,k3) per identity: 0, 1, 0
    assert sorted(s["unlinkability"]["mated"].tolist()) == [0.0] * 6 + [1.0] * 3


def test_product_scores_per_enrolment_size():
    """The product's own scores: one-photo template = photo A; two-photo = normalised A + A2 (where A2 exists)."""
    e = np.eye(4, dtype=np.float32)
    nan = np.full(4, np.nan, dtype=np.float32)
    rec = {
        "eng_cancel_k1": np.stack([e[0], e[1], e[2]]),
        "eng_cancel_k2": np.stack([e[3], e[3], e[3]]),
        "eng_cancel2_k1": np.stack([e[1], nan, e[2]]),  # identity b has no third photo
        "eng_probe_k1": np.stack([e[1], e[1], e[2]]),  # a's probe matches its SECOND enrolment photo only
        "eng_probe_k2": np.stack([e[3], e[0], e[3]]),
        "eng_impostor_k1": np.stack([e[2], e[0], e[0]]),
    }
    s = P.product_scores(rec)
    assert s["1"]["genuine"].tolist() == [0.0, 1.0, 1.0]
    assert s["1"]["genuine_reissued"].tolist() == [1.0, 0.0, 1.0]
    assert s["1"]["impostor_same_key"].tolist() == [0.0, 0.0, 0.0]
    assert s["1"]["old_key_probe_vs_reissued"].tolist() == [0.0, 0.0, 0.0]
    assert sorted(s["1"]["impostor_other_key"].tolist()) == [0.0] * 5 + [1.0]  # b's template vs a's probe
    assert np.allclose(s["2"]["genuine"], [np.sqrt(0.5), 1.0])  # (A + A2) / |A + A2| vs the probe: a and c
    assert np.allclose(s["2"]["impostor_same_key"], [0.0, 0.0])
    assert len(s["2"]["impostor_other_key"]) == 2
    # the product's decisions at its shipped threshold per size, and their lines in the report
    from worker.evaluation.report import _product_lines, product_decisions

    d = product_decisions(s, {"matcher": "m", "thresholds": {"1": 0.5, "2": 0.8}, "far": {"1": 1e-3, "2": None}})
    assert d is not None and d["1"]["genuine"] == {"rate": 2 / 3, "accepted": 2, "n": 3}
    assert d["2"]["genuine"]["accepted"] == 1 and d["2"]["threshold"] == 0.8  # 0.707 < 0.8 <= 1.0
    lines = "\n".join(_product_lines(d))
    assert "| 1 photo | 0.5000 (0.1 %) | 66.7 % (2/3) |" in lines and "| 2 photos | 0.8000 (n/a) |" in lines
    assert product_decisions(s, None) is None


def test_cli_parses_shards():
    args = build_parser().parse_args(["run", "--shard", "2/4", "--keys", "3", "--identities", "10"])
    assert args.shard == (2, 4) and args.keys == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--shard", "4/4"])
    with pytest.raises(ValueError):
        P.RunConfig(data_dir=".", keys=2)


def test_report_to_s3(merged, monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        boto3.client("s3").create_bucket(Bucket="reports")
        write_report(merged["report"], {"det.png": b"\x89PNG"}, "s3://reports/run1")
        listing = boto3.client("s3").list_objects_v2(Bucket="reports")["Contents"]
    assert sorted(o["Key"] for o in listing) == ["run1/det.png", "run1/report.json", "run1/report.md"]


def test_time_budget_stops_between_batches(dataset, engine, tmp_path):
    cfg = _cfg(dataset, pairs_file=None, time_budget_s=1e-6)
    P.run_shard(engine, PixelJudge(), cfg, tmp_path / "s", b"k" * 32, lambda line: None)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["stopped_by_time_budget"] and meta["n_identities_done"] == cfg.chunk  # the first batch always runs


def test_a_batch_of_one_has_no_impostor_score(dataset, engine, tmp_path):
    cfg = _cfg(dataset, pairs_file=None, identities=2, chunk=1)
    P.run_shard(engine, PixelJudge(), cfg, tmp_path / "s", b"k" * 32, lambda line: None)
    records, _ = P.load_shards([tmp_path / "s"])
    assert np.isnan(records["emb_impostor_k1"]).all()  # never the identity's own probe passed off as an impostor
    assert np.isfinite(records["emb_probe_k1"]).all()
