"""Enrol -> committed version in S3; verify -> score + decision; with the trained lite bundle, a genuine probe is
accepted and an impostor rejected. Real Redis + SeaweedFS + a celery worker subprocess (prefork, 1 child)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from worker_harness import LITE_MANIFEST, Deployment, deploy, job_id, running

from worker.contracts import JobStatus

pytestmark = pytest.mark.integration


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    yield from running(service_env, seaweed, tmp_path)


def _manifest(dep: Deployment, uri: str) -> dict:
    bucket, key = uri[5:].split("/", 1)
    return json.loads(dep.s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_enroll_commits_a_version_and_verify_scores(dep: Deployment) -> None:
    f = dep.faces
    res = dep.client.run(dep.client.enroll_job("acme", "obama", [f["obama"], f["obama2"]], "k1"), timeout=180)
    assert res.status == JobStatus.SUCCEEDED, res
    assert res.version == 1 and res.created is True and res.key_id == "k1" and res.key_version == 1
    man = _manifest(dep, res.manifest_uri)
    assert man["version"] == 1 and man["job_id"] == res.job_id and len(man["images"]) == 2
    assert [s["uri"] for s in man["source_images"]] == [f["obama"], f["obama2"]]
    # the pointer names the committed version, and every artefact it lists exists
    cur = json.loads(
        dep.s3.get_object(Bucket=dep.bucket, Key="tenants/acme/subjects/obama/current.json")["Body"].read()
    )
    assert cur["version"] == 1
    for a in [man["template"], *man["images"]]:
        assert dep.s3.head_object(Bucket=dep.bucket, Key=a["key"])["ContentLength"] == a["size"]
    tmpl = _manifest(dep, man["template"]["uri"])
    assert tmpl["bundle_id"] == "lite-random-test" and tmpl["algorithm"]["steps"] == 5
    assert "seed" not in json.dumps(tmpl).lower()

    v = dep.client.run(dep.client.verify_job("acme", "obama", f["obama3"]), timeout=180)
    assert v.status == JobStatus.SUCCEEDED, v
    assert v.version == 1 and -1.0 <= v.score <= 1.0 and v.decision in ("accept", "reject")
    assert v.threshold == dep.settings.engine.verify_threshold
    assert v.decision == ("accept" if v.score >= v.threshold else "reject")


def test_same_job_twice_gives_one_version(dep: Deployment) -> None:
    job = dep.client.enroll_job("acme", "twice", [dep.faces["obama"]], "k1", job_id=job_id("dup"))
    # two deliveries of one job queued back to back (a producer retry): both finish, one version exists
    dep.client.submit(job)
    dep.client.submit(job)
    first = dep.client.wait(job.ref, timeout=180)
    assert first.status == JobStatus.SUCCEEDED and first.version == 1
    again = dep.client.run(job, timeout=60)
    assert again.version == 1
    # the Redis result gone (e.g. expired): the re-delivered job finds its committed version in S3 instead
    dep.client.redis.delete(f"cf:result:{job.ref}")
    third = dep.client.run(job, timeout=180)
    assert third.status == JobStatus.SUCCEEDED and third.version == 1 and third.created is False
    versions = dep.s3.list_objects_v2(Bucket=dep.bucket, Prefix="tenants/acme/subjects/twice/versions/")
    assert [o["Key"].rsplit("/", 1)[-1] for o in versions["Contents"]] == ["0000000001.json"]


def _fixed_keyring(path: Path, key_ids: list[str]) -> None:
    import base64
    import hashlib

    keys = {
        k: {"b64": base64.b64encode(hashlib.sha256(f"lite-test-key:{k}".encode()).digest()).decode()} for k in key_ids
    }
    path.write_text(json.dumps({"format": "cancelable-keyring/1", "keys": keys}))
    path.chmod(0o600)


def _deploy_lite(service_env, seaweed, tmp_path: Path) -> Deployment:
    """A worker on the committed lite bundle at its default 50 steps, with fixed public test keys (not chosen by
    outcome): at the bundle's EER operating point about one genuine probe in eight is rejected (MODEL_CARD.md), so
    fresh random keys would make these tests flaky. deploy() keeps existing keyring entries."""
    _fixed_keyring(tmp_path / "keyring.json", ["k1", "k2"])
    return deploy(
        service_env,
        seaweed,
        tmp_path,
        bundle=LITE_MANIFEST.parent,
        CANCELABLE_ENGINE__STEPS="50",
        CANCELABLE_WORKER__TASK_TIME_LIMIT="500",
        CANCELABLE_WORKER__VISIBILITY_TIMEOUT="600",
    )


@pytest.mark.skipif(not LITE_MANIFEST.is_file(), reason=f"trained lite bundle not present ({LITE_MANIFEST})")
@pytest.mark.slow
def test_genuine_accepted_impostor_rejected_with_lite_bundle(service_env, seaweed, tmp_path: Path) -> None:
    dep = _deploy_lite(service_env, seaweed, tmp_path)
    try:
        f = dep.faces
        res = dep.client.run(dep.client.enroll_job("acme", "obama", [f["obama"], f["obama2"]], "k1"), timeout=600)
        assert res.status == JobStatus.SUCCEEDED, res
        genuine = dep.client.run(dep.client.verify_job("acme", "obama", f["obama3"]), timeout=600)
        impostor = dep.client.run(dep.client.verify_job("acme", "obama", f["biden"]), timeout=600)
        assert genuine.decision == "accept", genuine
        assert impostor.decision == "reject", impostor
        assert genuine.score > impostor.score
        # revoke: a new version under a new key version, and the same person verifies against it
        rev = dep.client.run(dep.client.revoke_job("acme", "reissue check", subject="obama"), timeout=600)
        assert rev.status == JobStatus.SUCCEEDED and rev.new_version == 2, rev
        again = dep.client.run(dep.client.verify_job("acme", "obama", f["obama3"]), timeout=600)
        assert again.version == 2 and again.decision == "accept", again
    finally:
        dep.worker.stop()
        dep.client.close()


def test_verify_refuses_a_template_made_by_other_engine_settings(dep: Deployment) -> None:
    f = dep.faces
    res = dep.client.run(dep.client.enroll_job("acme", "fp", [f["obama"]], "k1"), timeout=180)
    assert res.status == JobStatus.SUCCEEDED
    dep.restart(CANCELABLE_ENGINE__STEPS="6")  # steps change results: the old template is not comparable
    v = dep.client.run(dep.client.verify_job("acme", "fp", f["obama2"]), timeout=180)
    assert v.status == JobStatus.FAILED and v.error.code == "bundle_error", v
    assert "same bundle and engine settings" in v.error.message


def test_enroll_and_verify_with_kms_hmac_keys(service_env, seaweed, moto_kms: str, tmp_path: Path) -> None:
    """The worker derives seeds with KMS GenerateMac (moto's server): the key never leaves KMS."""
    import boto3

    kms = boto3.client(
        "kms",
        endpoint_url=moto_kms,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    key_id = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"]
    aes_key = kms.create_key()["KeyMetadata"]["KeyId"]  # not an HMAC key
    dep = deploy(
        service_env,
        seaweed,
        tmp_path,
        CANCELABLE_KEYS__PROVIDER="kms",
        CANCELABLE_KEYS__KMS_ENDPOINT_URL=moto_kms,
        CANCELABLE_KEYS__KMS_REGION="us-east-1",
        CANCELABLE_KEYS__KMS_ACCESS_KEY_ID="testing",
        CANCELABLE_KEYS__KMS_SECRET_ACCESS_KEY="testing",
    )
    try:
        f = dep.faces
        c = dep.client
        res = c.run(c.enroll_job("acme", "kms-subject", [f["obama"]], key_id), timeout=180)
        assert res.status == JobStatus.SUCCEEDED and res.key_id == key_id and res.version == 1, res
        v = c.run(c.verify_job("acme", "kms-subject", f["obama2"]), timeout=180)
        assert v.status == JobStatus.SUCCEEDED and v.key_id == key_id, v
        bad = c.run(c.enroll_job("acme", "kms-aes", [f["obama"]], aes_key), timeout=180)
        assert bad.status == JobStatus.FAILED and bad.error.code == "unknown_key", bad
        missing = c.run(c.enroll_job("acme", "kms-none", [f["obama"]], "alias/does-not-exist"), timeout=180)
        assert missing.status == JobStatus.FAILED and missing.error.code == "unknown_key", missing
    finally:
        dep.worker.stop()
        dep.client.close()


def test_control_worker_expires_uploaded_photos_and_nothing_else(dep: Deployment) -> None:
    """The beat-scheduled upload sweep on a real worker and SeaweedFS: the CLI's content-named uploads past the
    retention are deleted, young ones kept, and a producer's own objects in the input bucket never touched."""
    from worker.broker.config import TASK_SWEEP_UPLOADS

    uploads = [f"tenants/{t}/uploads/{c * 32}.jpg" for t, c in (("acme", "a"), ("beta", "b"))]
    own = ["tenants/acme/photos/uploads.jpg", "tenants/acme/uploads/not-a-hash.jpg", "elsewhere/x.jpg"]
    for key in uploads + own:
        dep.s3.put_object(Bucket=dep.input_bucket, Key=key, Body=b"photo")

    def keys() -> set[str]:
        return {o["Key"] for o in dep.s3.list_objects_v2(Bucket=dep.input_bucket).get("Contents", [])}

    young = dep.client.app.send_task(TASK_SWEEP_UPLOADS, kwargs={"older_than_s": 3600}).get(timeout=60)
    assert young["seen"] == 2 and young["deleted"] == 0 and set(uploads) <= keys()
    old = dep.client.app.send_task(TASK_SWEEP_UPLOADS, kwargs={"older_than_s": 0}).get(timeout=60)
    assert old["seen"] == 2 and old["deleted"] == 2, old
    left = keys()
    assert not set(uploads) & left
    assert set(own) <= left and "tenants/acme/obama.jpg" in left  # what producers put there themselves


def test_control_worker_runs_the_staging_sweep(dep: Deployment) -> None:
    """The beat-scheduled task, sent by name to a real worker: it visits the subject and keeps young orphans
    (deleting old ones is tested against S3 with a moved clock in test_storage_versions)."""
    from worker.broker.config import TASK_SWEEP_STAGING

    orphan = "tenants/acme/subjects/sweepme/staging/" + "a" * 32 + "/1/images/000.png"
    dep.s3.put_object(Bucket=dep.bucket, Key=orphan, Body=b"orphan")
    res = dep.client.app.send_task(TASK_SWEEP_STAGING, kwargs={"tenant": "acme"}).get(timeout=60)
    assert res["subjects"] == 1 and res["deleted"] == 0, res
    assert dep.s3.get_object(Bucket=dep.bucket, Key=orphan)["Body"].read() == b"orphan"


def test_verify_states_far_per_enrolment_size_and_refuses_another_matcher(dep: Deployment) -> None:
    """A template records its enrolment size and matcher; verify decides at the bundle's threshold for that size,
    states the false-accept rate it stands for, takes a target FAR instead of a threshold, and refuses a FAR the
    calibration does not hold or a template of another matcher, each with its own error code."""
    from worker.bundle_config import matcher_of

    f = dep.faces
    bundle = Path(dep.env["CANCELABLE_ENGINE__BUNDLE"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    res = dep.client.run(dep.client.enroll_job("acme", "cal", [f["obama"]], "k1"), timeout=180)
    assert res.status == JobStatus.SUCCEEDED, res
    tmpl = _manifest(dep, _manifest(dep, res.manifest_uri)["template"]["uri"])
    assert tmpl["enrolment_size"] == 1 and tmpl["matcher"] == matcher_of(manifest)

    v = dep.client.run(dep.client.verify_job("acme", "cal", f["obama2"]), timeout=180)
    assert v.status == JobStatus.SUCCEEDED, v
    assert v.enrolment_size == 1 and v.matcher == tmpl["matcher"] and v.far is None  # not calibrated
    v = dep.client.run(dep.client.verify_job("acme", "cal", f["obama2"], far=1e-3), timeout=180)
    assert v.status == JobStatus.FAILED and v.error.code == "uncalibrated_far", v

    # a calibrated manifest (what calibrate-threshold writes): thresholds and operating points per size
    def point(far_target: float, threshold: float, far: float) -> dict:
        return {"far_target": far_target, "threshold": threshold, "far": far, "far_ci95": [0.0, 2 * far + 1e-3]}

    manifest["verify"] = {
        "matcher": tmpl["matcher"],
        "target_far": 1e-2,
        "thresholds": {"1": -0.25, "2": 0.5, "3+": 0.6},
        "operating_points": {"1": [point(1e-1, -0.5, 0.08), point(1e-2, -0.25, 0.009)], "2": [point(1e-2, 0.5, 0.01)]},
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    dep.restart()
    v = dep.client.run(dep.client.verify_job("acme", "cal", f["obama2"]), timeout=180)
    assert v.status == JobStatus.SUCCEEDED and v.threshold == -0.25 and v.far == 0.009, v
    assert v.far_ci95 == (0.0, 0.019)
    assert v.decision == ("accept" if v.score >= -0.25 else "reject")
    v = dep.client.run(dep.client.verify_job("acme", "cal", f["obama2"], far=0.05), timeout=180)
    assert v.status == JobStatus.SUCCEEDED and v.threshold == -0.25 and v.far == 0.009, v
    v = dep.client.run(dep.client.verify_job("acme", "cal", f["obama2"], far=0.2), timeout=180)
    assert v.threshold == -0.5 and v.far == 0.08, v

    manifest["verify"]["matcher"] = "another-recognizer:0123456789ab:cosine"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    dep.restart()
    v = dep.client.run(dep.client.verify_job("acme", "cal", f["obama2"]), timeout=180)
    assert v.status == JobStatus.FAILED and v.error.code == "matcher_mismatch", v
    assert "another-recognizer" in v.error.message
