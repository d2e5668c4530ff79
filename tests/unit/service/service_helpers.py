"""Job builders and S3 readers shared by the service unit tests."""

from __future__ import annotations

import json
from typing import Any

from service_fakes import BUCKET, FakeRuntime, face_png

from worker.contracts import EnrollJob, EnrollResult, job_from_wire
from worker.service import enrol
from worker.service.clock import now

_ids = iter(range(1, 10**9))


def new_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids):06d}"


def enroll_job(
    rt: FakeRuntime,
    subject: str,
    person: int = 0,
    key_id: str = "k1",
    tenant: str = "acme",
    captures: int = 1,
    job_id: str | None = None,
) -> EnrollJob:
    """An enrol job over ``captures`` synthetic photos of ``person`` put in the tenant's input prefix."""
    images = [rt.put_input(tenant, f"{subject}-{person}-{c}.png", face_png(person, c)) for c in range(captures)]
    job: EnrollJob = job_from_wire(
        {
            "kind": "enroll",
            "job_id": job_id or new_id("en"),
            "tenant": tenant,
            "subject": subject,
            "images": images,
            "key_id": key_id,
        }
    )
    return job


def run_enroll(rt: FakeRuntime, job: EnrollJob, queued_at: float | None = None) -> EnrollResult:
    return enrol.enroll(rt, job, 1, now(), queued_at)


def job(**wire: Any) -> Any:
    wire.setdefault("job_id", new_id(str(wire["kind"])[:2]))
    return job_from_wire(wire)


def read_json(rt: FakeRuntime, key: str) -> Any:
    return json.loads(rt.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def subject_keys(rt: FakeRuntime, tenant: str, subject: str, part: str = "") -> list[str]:
    return rt.s3.keys(BUCKET, f"tenants/{tenant}/subjects/{subject}/{part}")
