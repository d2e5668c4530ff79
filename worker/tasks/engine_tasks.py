"""Engine-queue tasks (GPU work): enroll, verify, re-enrolment chunks of a revocation. Thin: each is a ``JobTask``
(``worker.tasks.envelope``) whose ``handle`` calls the service (``worker.service.enrol`` / ``verify`` /
``reissue``)."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from worker.broker.config import TASK_ENGINE_PING, TASK_ENROLL, TASK_REENROLL_CHUNK, TASK_VERIFY
from worker.contracts import ChunkResult, EnrollJob, EnrollResult, ReenrollChunk, VerifyJob, VerifyResult
from worker.errors import MalformedJobError
from worker.service import enrol, reissue
from worker.service import verify as verify_service
from worker.service.clock import now
from worker.service.fanout import report_bulk_child
from worker.tasks.app import app
from worker.tasks.envelope import Delivery, JobTask

if TYPE_CHECKING:
    from worker.service.runtime import Runtime


def _sent_at(request: Any) -> float | None:
    """The producer's ``sent_at`` header (epoch seconds) of the message being run, if it carries one."""
    v = getattr(request, "sent_at", None)
    if v is None:
        v = (getattr(request, "headers", None) or {}).get("sent_at")
    return float(v) if isinstance(v, int | float) and v > 0 else None


class EnrollTask(JobTask[EnrollJob, EnrollResult]):
    """Enrol one subject (``EnrollJob`` JSON) -> ``EnrollResult`` JSON. ``parent``: the bulk job it belongs to."""

    name = TASK_ENROLL
    job_model = EnrollJob
    result_model = EnrollResult
    job_type = "enroll"

    def run(self, *args: Any, parent: str | None = None, **kwargs: Any) -> dict[str, Any]:
        if parent is not None and not isinstance(parent, str):
            kwargs["parent"] = parent  # rejected as malformed
            parent = None
        return self.run_job(args, kwargs, Delivery(parent=parent))

    def handle(self, rt: Runtime, job: EnrollJob, attempt: int, started: datetime, delivery: Delivery) -> EnrollResult:
        return enrol.enroll(rt, job, attempt, started, queued_at=_sent_at(self.request))

    def ident(self, job: EnrollJob) -> dict[str, Any]:
        return {"subject": job.subject, "key_id": job.key_id}

    def after_stored(self, rt: Runtime, job: EnrollJob, result: EnrollResult) -> None:
        enrol.forget_if_erased(rt, job, result)

    def reports_terminal(self, delivery: Delivery) -> bool:
        return bool(delivery.parent)

    def on_terminal(self, rt: Runtime, job: EnrollJob, result: EnrollResult, delivery: Delivery) -> None:
        if delivery.parent:
            report_bulk_child(rt, job.tenant, delivery.parent, job.job_id, result)


class VerifyTask(JobTask[VerifyJob, VerifyResult]):
    """Score a probe (``VerifyJob`` JSON) against the subject's current template -> ``VerifyResult`` JSON."""

    name = TASK_VERIFY
    job_model = VerifyJob
    result_model = VerifyResult
    job_type = "verify"

    def handle(self, rt: Runtime, job: VerifyJob, attempt: int, started: datetime, delivery: Delivery) -> VerifyResult:
        return verify_service.verify(rt, job, attempt, started)

    def ident(self, job: VerifyJob) -> dict[str, Any]:
        return {"subject": job.subject}


class ReenrollChunkTask(JobTask[ReenrollChunk, ChunkResult]):
    """Re-enrol a chunk of a revocation's subjects under their new key version (internal; sent by ``revoke``)."""

    name = TASK_REENROLL_CHUNK
    job_model = ReenrollChunk
    result_model = ChunkResult
    job_type = "reenroll"

    def parse(self, data: dict[str, Any]) -> ReenrollChunk:
        try:
            return ReenrollChunk.model_validate_json(json.dumps(data))
        except (ValidationError, ValueError, TypeError):
            raise MalformedJobError("malformed re-enrolment chunk") from None

    def parse_result(self, data: dict[str, Any]) -> ChunkResult:
        return ChunkResult.model_validate(data)

    def handle(
        self, rt: Runtime, job: ReenrollChunk, attempt: int, started: datetime, delivery: Delivery
    ) -> ChunkResult:
        return reissue.reenroll(rt, job, attempt, started)

    def ident(self, job: ReenrollChunk) -> dict[str, Any]:
        return {"parent_job_id": job.parent_job_id}

    def reports_terminal(self, delivery: Delivery) -> bool:
        return True

    def is_background(self, delivery: Delivery) -> bool:
        return True

    def on_terminal(self, rt: Runtime, job: ReenrollChunk, result: ChunkResult, delivery: Delivery) -> None:
        reissue.chunk_finished(rt, job, result)


enroll = app.register_task(EnrollTask())
verify = app.register_task(VerifyTask())
reenroll_chunk = app.register_task(ReenrollChunkTask())


@app.task(name=TASK_ENGINE_PING)
def engine_ping() -> dict[str, Any]:
    """Liveness of an engine worker process: pid and whether its models are loaded (loads nothing)."""
    from worker.tasks.runtime import get_runtime

    rt = get_runtime()
    return {"pid": os.getpid(), "engine_loaded": rt.engine_loaded, "at": now().isoformat()}
