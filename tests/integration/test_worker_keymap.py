"""The keymap bundle in a real worker (Redis + SeaweedFS + a celery worker subprocess): genuine accepted, impostor
rejected; after revoke + reissue the reissued template does not match the revoked one at the worker's threshold,
the subject still verifies and an impostor is still rejected. Fixed public test keys (deterministic)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from worker_harness import Deployment, deploy

from worker.contracts import JobStatus

REPO = Path(__file__).resolve().parents[2]
KEYMAP_MANIFEST = REPO / "worker" / "bundles" / "keymap" / "manifest.json"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gan_face_generate") is None or not KEYMAP_MANIFEST.is_file(),
        reason="gan-face-generate not installed (scripts/bootstrap.sh installs it with --no-deps) or no keymap bundle",
    ),
]


def _deploy_keymap(service_env, seaweed, tmp_path: Path) -> Deployment:
    keys = {
        k: {"b64": base64.b64encode(hashlib.sha256(f"keymap-test-key:{k}".encode()).digest()).decode()}
        for k in ("k1", "k2")
    }
    ring = tmp_path / "keyring.json"
    ring.write_text(json.dumps({"format": "cancelable-keyring/1", "keys": keys}))
    ring.chmod(0o600)
    return deploy(
        service_env,
        seaweed,
        tmp_path,
        bundle=KEYMAP_MANIFEST.parent,
        CANCELABLE_WORKER__TASK_TIME_LIMIT="500",
        CANCELABLE_WORKER__VISIBILITY_TIMEOUT="600",
    )


def test_keymap_worker_verifies_and_reissue_is_unlinkable(service_env, seaweed, tmp_path: Path) -> None:
    dep = _deploy_keymap(service_env, seaweed, tmp_path)
    try:
        f = dep.faces
        res = dep.client.run(dep.client.enroll_job("acme", "obama", [f["obama"], f["obama2"]], "k1"), timeout=600)
        assert res.status == JobStatus.SUCCEEDED, res
        genuine = dep.client.run(dep.client.verify_job("acme", "obama", f["obama3"]), timeout=600)
        impostor = dep.client.run(dep.client.verify_job("acme", "obama", f["biden"]), timeout=600)
        assert genuine.decision == "accept", genuine
        assert impostor.decision == "reject", impostor
        rev = dep.client.run(dep.client.revoke_job("acme", "reissue check", subject="obama"), timeout=600)
        assert rev.status == JobStatus.SUCCEEDED and rev.new_version == 2, rev
        from worker.storage.client import ObjectStore
        from worker.storage.templates import TemplateStore

        ts = TemplateStore(ObjectStore.from_settings(dep.settings.s3))
        t1 = ts.load_template(ts.get_manifest("acme", "obama", 1)).vector()
        t2 = ts.load_template(ts.get_manifest("acme", "obama", 2)).vector()
        again = dep.client.run(dep.client.verify_job("acme", "obama", f["obama3"]), timeout=600)
        assert again.version == 2 and again.decision == "accept", again
        # scored as the worker scores (the bundle's matcher: cosine in the key map's whitened generator coordinates)
        import numpy as np
        import torch

        from worker.algorithm.keymap import load_keymap

        km = load_keymap(KEYMAP_MANIFEST.parent / "keymap.pt")
        c1, c2 = torch.nn.functional.normalize(km.cpu_gen_coords(torch.from_numpy(np.stack([t1, t2]))), dim=-1)
        linked = float(c1 @ c2)
        assert again.threshold is not None and linked < again.threshold, (linked, again.threshold)
        impostor2 = dep.client.run(dep.client.verify_job("acme", "obama", f["biden"]), timeout=600)
        assert impostor2.version == 2 and impostor2.decision == "reject", impostor2
    finally:
        dep.worker.stop()
        dep.client.close()
