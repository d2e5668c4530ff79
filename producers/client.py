"""``Client``: queue jobs by task NAME, wait for their results, read fan-out progress. Never imports torch.

Jobs are validated with the contracts before anything is queued (unknown fields, malformed refs and bad IDs raise
``MalformedJobError``). Results are read from the workers' Redis result records (``{p}:result:{tenant}/{job_id}``),
which every terminal job writes, fan-out parents included (the Celery result of a revoke or bulk task only says
``running``).

A job ID is unique only within its tenant: a job is named by its *reference* ``{tenant}/{job_id}``
(``worker.contracts.job_ref``, ``job.ref``), which ``submit`` returns, ``wait`` / ``result`` / ``status`` /
``redrive`` take (or the job itself), and which is the Celery task ID of its message.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.broker.config import (
    CONTROL_QUEUE,
    ENGINE_BULK_QUEUE,
    ENGINE_QUEUE,
    TASK_BULK,
    TASK_ENGINE_PING,
    TASK_ENROLL,
    TASK_ERASE,
    TASK_PING,
    TASK_REVOKE,
    TASK_VERIFY,
    connect_redis,
    connect_store,
    make_celery,
)
from worker.broker.publish import PUBLISH_BATCH, BatchSender, short_argsrepr
from worker.contracts import (
    BulkJob,
    BulkManifest,
    EnrollJob,
    EraseJob,
    RevokeJob,
    VerifyJob,
    job_from_wire,
    jobs_from_wire,
    parse_job_ref,
    result_from_wire,
    to_wire,
    to_wire_many,
)
from worker.errors import MalformedJobError
from worker.storage.jobbook import JobBook, JobProgress

if TYPE_CHECKING:
    from producers.uploads import LocalImage
    from worker.settings import Settings
    from worker.storage.subjects import SubjectState

TASK_FOR_KIND = {
    "enroll": (TASK_ENROLL, ENGINE_QUEUE),
    "verify": (TASK_VERIFY, ENGINE_QUEUE),
    "revoke": (TASK_REVOKE, CONTROL_QUEUE),
    "bulk": (TASK_BULK, CONTROL_QUEUE),
    "erase": (TASK_ERASE, CONTROL_QUEUE),
}


_JOB_MODELS = (EnrollJob, VerifyJob, RevokeJob, BulkJob, EraseJob)
_VALIDATE_STEP = 32  # jobs validated and rendered at a time inside a batch


def _route(kind: str, background: bool) -> tuple[str, str]:
    """(task name, queue) of a job kind; ``background`` engine work goes to the bulk engine queue."""
    name, queue = TASK_FOR_KIND[kind]
    return (name, ENGINE_BULK_QUEUE) if background and queue == ENGINE_QUEUE else (name, queue)


class JobTimeout(TimeoutError):
    """The job did not reach a terminal state in time (it may still finish; ask ``status``)."""


class JobErased(LookupError):
    """The job's records were deleted by an erasure of its subject (or tenant): there is no result to wait for."""


def new_job_id() -> str:
    return uuid.uuid4().hex


class Client:
    """Producer side of the queue. ``settings`` defaults to ``worker.settings.get_settings()``."""

    def __init__(self, settings: Settings | None = None) -> None:
        if settings is None:
            from worker.settings import get_settings

            settings = get_settings()
        self.settings = settings
        self.app = make_celery(settings, name="cancelable-producer")
        self._redis: Any = None
        self._store: Any = None

    # --- resources ---------------------------------------------------------------------------------------------
    @property
    def redis(self) -> Any:
        if self._redis is None:
            self._redis = connect_redis(self.settings)
        return self._redis

    @property
    def book(self) -> JobBook:
        return JobBook(self.redis)

    @property
    def store(self) -> Any:
        if self._store is None:
            self._store = connect_store(self.settings)
        return self._store

    # --- local photos -------------------------------------------------------------------------------------------
    def local_image(self, tenant: str, path: str | Path) -> LocalImage:
        """Check a local photo and compute the ``s3://`` reference it gets in the tenant's input prefix (no network).
        ``MalformedJobError`` when it is missing, not an image, too large, or no input bucket is configured."""
        from producers.uploads import check_local_image
        from worker.contracts import check_name

        try:
            check_name(tenant, "tenant")
        except ValueError as e:
            raise MalformedJobError(f"malformed job: {e}") from None
        w = self.settings.worker
        return check_local_image(path, tenant, self.input_bucket, w.max_bytes, w.max_pixels, w.max_pixels_full_decode)

    @property
    def input_bucket(self) -> str:
        """Where local photos are uploaded (``s3.input_bucket``, default ``<bucket>-inputs``)."""
        from worker.contracts.inputs import InputPolicy

        return InputPolicy.from_settings(self.settings.s3).input_bucket

    def upload(self, images: Iterable[LocalImage]) -> list[str]:
        """Upload checked local photos to the input bucket (SSE as configured); returns their ``s3://`` URIs."""
        from worker.storage.client import ObjectStore, sse_params

        inputs = ObjectStore(self.store.client, self.input_bucket, sse=sse_params(self.settings.s3))
        uris = []
        for img in images:
            inputs.put(img.key, img.body, content_type=img.content_type)
            uris.append(img.uri)
        return uris

    # --- subjects -----------------------------------------------------------------------------------------------
    def subject(self, tenant: str, subject: str) -> SubjectState | None:
        """What is stored about ``tenant``/``subject`` (current version, key version, revoked versions), or None."""
        from worker.contracts import check_name
        from worker.storage.subjects import read_subject

        try:
            check_name(tenant, "tenant"), check_name(subject, "subject")
        except ValueError as e:
            raise MalformedJobError(f"malformed request: {e}") from None
        return read_subject(self.store, tenant, subject)

    # --- building jobs -----------------------------------------------------------------------------------------
    @staticmethod
    def validate(job: Any) -> Any:
        """A job model or its wire dict -> validated job model (``MalformedJobError`` otherwise)."""
        if isinstance(job, _JOB_MODELS):
            return job_from_wire(to_wire(job))
        if isinstance(job, dict):
            return job_from_wire(job)
        raise MalformedJobError(f"malformed job: expected a job model or dict, got {type(job).__name__}")

    def enroll_job(self, tenant: str, subject: str, images: Iterable[str], key_id: str, job_id: str | None = None):
        return self.validate(
            {
                "kind": "enroll",
                "job_id": job_id or new_job_id(),
                "tenant": tenant,
                "subject": subject,
                "images": list(images),
                "key_id": key_id,
            }
        )

    def verify_job(
        self,
        tenant: str,
        subject: str,
        probe: str,
        threshold: float | None = None,
        job_id: str | None = None,
        far: float | None = None,
    ):
        d: dict[str, Any] = {
            "kind": "verify",
            "job_id": job_id or new_job_id(),
            "tenant": tenant,
            "subject": subject,
            "probe": probe,
        }
        if threshold is not None:
            d["threshold"] = threshold
        if far is not None:
            d["far"] = far
        return self.validate(d)

    def revoke_job(
        self,
        tenant: str,
        reason: str,
        *,
        subject: str | None = None,
        key_id: str | None = None,
        new_key_id: str | None = None,
        purge_old_images: bool = False,
        job_id: str | None = None,
    ):
        return self.validate(
            {
                "kind": "revoke",
                "job_id": job_id or new_job_id(),
                "tenant": tenant,
                "subject": subject,
                "key_id": key_id,
                "reason": reason,
                "new_key_id": new_key_id,
                "purge_old_images": purge_old_images,
            }
        )

    def erase_job(
        self,
        tenant: str,
        reason: str,
        *,
        subject: str | None = None,
        all_subjects: bool = False,
        confirm: str | None = None,
        job_id: str | None = None,
    ):
        """Erase one subject, or (``all_subjects``, ``confirm`` repeating the tenant) every subject of the tenant."""
        d: dict[str, Any] = {"kind": "erase", "job_id": job_id or new_job_id(), "tenant": tenant, "reason": reason}
        if subject is not None:
            d["subject"] = subject
        if all_subjects:
            d["all_subjects"], d["confirm"] = True, confirm
        return self.validate(d)

    def bulk_job(
        self,
        tenant: str,
        key_id: str,
        manifest: str,
        fmt: str | None = None,
        naming_rule: str | None = None,
        chunk_size: int | None = None,
        job_id: str | None = None,
    ):
        """``manifest``: ``s3://...`` (CSV/JSONL object or, with fmt=prefix, a prefix) in the tenant's input prefix
        (or its allow-list), or a local CSV/JSONL file, which is checked row by row here (any bad row: nothing is
        uploaded or queued, ``MalformedJobError`` lists the lines) and uploaded to the tenant's input prefix,
        ``s3://{input bucket}/tenants/{tenant}/manifests/{job_id}.{ext}``. The naming rule is compiled here (RE2) as
        the worker will. ``ForbiddenInputError`` for an ``s3://`` manifest the tenant may not read."""
        from worker.contracts import S3Prefix, S3Ref, check_name
        from worker.contracts.inputs import InputPolicy

        job_id = job_id or new_job_id()
        fmt = fmt or _guess_format(manifest)
        m: dict[str, Any] = {"format": fmt, "uri": manifest}
        if naming_rule is not None:
            m["naming_rule"] = naming_rule
        try:
            check_name(tenant, "tenant")
            bm = BulkManifest.model_validate(m)
        except ValueError as e:  # pydantic ValidationError is a ValueError
            raise MalformedJobError(_one_line(e)) from None
        if bm.is_s3:
            where = S3Prefix.model_validate(bm.uri) if fmt == "prefix" else S3Ref.model_validate(bm.uri)
            InputPolicy.from_settings(self.settings.s3).check(tenant, where)  # what the worker checks first
        else:
            m["uri"] = self._upload_manifest(tenant, Path(manifest), fmt, job_id)
        d: dict[str, Any] = {"kind": "bulk", "job_id": job_id, "tenant": tenant, "key_id": key_id, "manifest": m}
        if chunk_size is not None:
            d["chunk_size"] = chunk_size
        return self.validate(d)

    def _upload_manifest(self, tenant: str, path: Path, fmt: str, job_id: str) -> str:
        from producers.manifests import check_manifest
        from worker.contracts import check_job_id
        from worker.storage.client import ObjectStore, sse_params
        from worker.storage.layout import manifest_upload_key

        try:
            check_job_id(job_id)
        except ValueError as e:
            raise MalformedJobError(f"malformed job: {e}") from None
        found = check_manifest(path, fmt)  # a full validating pass, streaming
        if found.bad_rows:
            raise MalformedJobError(found.message(path))
        key = manifest_upload_key(tenant, job_id, fmt)
        inputs = ObjectStore(self.store.client, self.input_bucket, sse=sse_params(self.settings.s3))
        with path.open("rb") as f:
            inputs.put(key, f.read(), content_type="text/csv" if fmt == "csv" else "application/x-ndjson")
        return inputs.uri(key)

    # --- bulk reports ------------------------------------------------------------------------------------------------
    def report_uri(self, job: Any, fmt: str = "jsonl") -> str | None:
        """Where the report of bulk job ``job`` (a reference ``tenant/job_id`` or the job) lies (``fmt`` jsonl or
        csv), once the job has finished; None while it runs or when ``job`` is not a finished bulk job."""
        res = self.book.get_result(job_reference(job))
        if res is None or res.get("kind") != "bulk" or not res.get("report_uri"):
            return None
        uri = str(res["report_uri"])
        return uri if fmt == "jsonl" else uri[: -len("jsonl")] + fmt

    def report(self, job: Any, fmt: str = "jsonl", max_bytes: int | None = None) -> bytes | None:
        """The bulk job's report (its first ``max_bytes`` bytes if given), or None (see ``report_uri``)."""
        from worker.contracts import S3Ref

        uri = self.report_uri(job, fmt)
        if uri is None:
            return None
        ref = S3Ref.model_validate(uri)
        kw: dict[str, Any] = {"Bucket": ref.bucket, "Key": ref.key}
        if max_bytes is not None:
            kw["Range"] = f"bytes=0-{max_bytes - 1}"
        try:
            return bytes(self.store.client.get_object(**kw)["Body"].read())
        except Exception as e:  # mapped to StorageError / ObjectNotFoundError
            self.store._raise(e, "get", ref.bucket, ref.key)
            raise

    def report_head(self, job: Any, n: int = 5) -> list[dict[str, Any]]:
        """The first ``n`` failed rows of the bulk job's report (by line); [] when there is none."""
        raw = self.report(job, "jsonl", max_bytes=64 * 1024)
        if not raw:
            return []
        rows = []
        for line in raw.decode("utf-8", "replace").splitlines()[:n]:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # the range cut the last line
        return rows

    # --- sending -------------------------------------------------------------------------------------------------
    def submit(self, job: Any) -> str:
        """Validate and queue a job; returns its reference ``tenant/job_id`` (also the Celery task ID)."""
        job = self.validate(job)
        self._send(job)
        self.book.mark_submitted(job.ref)
        return str(job.ref)

    def submit_many(self, jobs: Iterable[Any], batch: int = PUBLISH_BATCH, *, background: bool = False) -> list[str]:
        """``submit`` for many jobs, ``batch`` at a time: each batch is validated, then published in one Redis round
        trip (plus one for the submit markers). The list items are the ones ``submit`` pushes (same envelope, queue,
        headers, task IDs; see ``worker.broker.publish.BatchSender``). Returns the job references in order.
        ``background=True`` sends enrol and verify jobs to the bulk engine queue, behind every user's interactive
        work (for back-office batches; ``cancelable bulk`` does this by itself).

        Constant memory in the number of jobs (``jobs`` may be a generator; the returned references aside). A
        malformed job raises ``MalformedJobError`` before anything of its batch is queued; the batches before it are
        queued."""
        if batch < 1:
            raise ValueError("batch must be >= 1")
        ids: list[str] = []
        route = {kind: _route(kind, background) for kind in TASK_FOR_KIND}
        sender = BatchSender(self.app, sent_at=True)  # exact queue age in the metrics (worker.metrics.SENT_AT_HEADER)
        it = iter(jobs)
        step = min(batch, _VALIDATE_STEP)
        while True:
            refs: list[str] = []
            try:  # validated and rendered a few jobs at a time (few live objects: see BatchSender.add), sent at once
                while len(refs) < batch and (chunk := list(islice(it, min(step, batch - len(refs))))):
                    wires = to_wire_many(self.validate_many(chunk))
                    chunk_refs = [f"{w['tenant']}/{w['job_id']}" for w in wires]  # job.ref: both parts are validated
                    sender.add(
                        [
                            (*route[w["kind"]], ref, w, short_argsrepr(w["kind"], w["job_id"]))
                            for w, ref in zip(wires, chunk_refs, strict=True)
                        ]
                    )
                    refs += chunk_refs
            except BaseException:
                sender.discard()  # nothing of a batch with a malformed job is queued
                raise
            if not refs:
                return ids
            sender.flush()
            self.book.mark_submitted_many(refs)
            ids.extend(refs)

    @classmethod
    def validate_many(cls, jobs: Sequence[Any]) -> list[Any]:
        """``validate`` for many jobs at once (one validator call for the lot); the first malformed job raises the
        ``MalformedJobError`` that ``validate`` gives it."""
        wire = []
        for job in jobs:
            if isinstance(job, dict):
                wire.append(job)
            elif isinstance(job, _JOB_MODELS):
                wire.append(to_wire(job))
            else:  # not a job at all: one by one, so that an earlier bad job still raises first
                return [cls.validate(j) for j in jobs]
        return jobs_from_wire(wire)

    def _send(self, job: Any) -> None:
        name, queue = _route(job.kind, background=False)
        # results are read from the workers' own Redis records (see ``result``), not Celery's result backend
        self.app.send_task(
            name,
            args=[to_wire(job)],
            task_id=job.ref,
            queue=queue,
            ignore_result=True,
            headers={"sent_at": time.time()},  # exact queue age in the metrics (worker.metrics.SENT_AT_HEADER)
            argsrepr=short_argsrepr(job.kind, str(job.job_id)),  # not Celery's repr of the whole job
        )

    def result(self, job: Any) -> Any | None:
        """The terminal result of ``job`` (a reference ``tenant/job_id`` or the job; a contracts result model), or None
        while it is not finished."""
        raw = self.book.get_result(job_reference(job))
        if raw is None:
            return None
        try:
            return result_from_wire(raw)
        except MalformedJobError:
            return raw  # a malformed-message result has no tenant/subject: the raw dict

    def wait(
        self,
        job: Any,
        timeout: float = 600.0,
        poll: float = 0.2,
        on_progress: Callable[[JobProgress], None] | None = None,
    ) -> Any:
        """Block until ``job`` (a reference ``tenant/job_id`` or the job) is terminal; returns its result.
        ``on_progress`` gets fan-out progress."""
        ref = job_reference(job)
        deadline = time.monotonic() + timeout
        while True:
            res = self.result(ref)
            if res is not None:
                if on_progress is not None and self.book.exists(ref):
                    on_progress(self.book.progress(ref))
                return res
            if on_progress is not None and self.book.exists(ref):
                on_progress(self.book.progress(ref))
            if self.book.was_erased(ref):
                raise JobErased(f"job {ref} was erased with its subject: its records were deleted")
            if time.monotonic() > deadline:
                raise JobTimeout(f"job {ref} not finished after {timeout:.0f} s (it may still finish)")
            time.sleep(poll)

    def run(self, job: Any, timeout: float = 600.0, **kw: Any) -> Any:
        """``submit`` then ``wait``."""
        return self.wait(self.submit(job), timeout=timeout, **kw)

    # --- status ----------------------------------------------------------------------------------------------------
    def status(self, job: Any) -> dict[str, Any]:
        """What is known about ``job`` (a reference ``tenant/job_id`` or the job): terminal result, fan-out counts by
        state, attempts, dead letter.

        ``state`` is ``unknown`` when nothing is recorded: never queued through a ``Client``, its records expired
        (30 days), or a fan-out child that has not started yet."""
        job_id = job_reference(job)
        tenant, plain = parse_job_ref(job_id)
        out: dict[str, Any] = {"job": job_id, "tenant": tenant, "job_id": plain}
        book = self.book
        res = book.get_result(job_id)
        if book.exists(job_id):
            progress = book.progress(job_id)
            if progress.kind in ("bulk", "revoke"):  # fan-out counts; other jobs' records only hold retry notes
                out["progress"] = progress.as_dict()
        # the attempt counter gives back attempts that ended in a transient fault; a result counts them all
        out["attempts"] = max(book.attempts(job_id), int((res or {}).get("attempts") or 0))
        dl = book.get_dead_letter(job_id)
        if dl is not None:
            out["dead_letter"] = {k: dl.get(k) for k in ("error_code", "attempts", "s3_uri", "at")}
        if res is not None:
            out["state"] = res.get("status")
            out["result"] = res
        elif "progress" in out:
            out["state"] = out["progress"]["state"]
        elif book.was_erased(job_id):
            out["state"] = "erased"  # its records were deleted by an erasure of its subject or tenant
        else:
            st = self.app.AsyncResult(job_id).state  # PENDING covers unknown and queued alike
            if st != "PENDING":
                out["state"] = {"STARTED": "running", "RETRY": "retrying"}.get(st, st.lower())
            elif dl is not None:
                out["state"] = "dead_lettered"
            elif out["attempts"]:
                out["state"] = "running"
            elif book.submitted_at(job_id) is not None:
                out["state"] = "queued"
            else:
                out["state"] = "unknown"
        return out

    def redrive(self, job: Any) -> str:
        """Queue a dead-lettered job (a reference ``tenant/job_id``) again under the same job ID (its Redis result,
        attempts and dead letter are cleared first; the S3 dead letter stays as the record). Raises
        ``MalformedJobError`` when it has no dead letter, or one without the job (a refused message: it never was a
        job), or one whose job is not that job."""
        ref = job_reference(job)
        dl = self.book.get_dead_letter(ref)
        if dl is None:
            raise MalformedJobError(f"job {ref} has no dead letter to redrive")
        if not isinstance(dl.get("job"), dict) or not dl["job"]:
            raise MalformedJobError(f"dead letter {ref} holds no job (a malformed message cannot be re-driven)")
        queued = self.validate(dl["job"])
        if queued.ref != ref:
            raise MalformedJobError(f"dead letter {ref} holds another job")
        self.book.clear_for_redrive(ref)
        return self.submit(queued)

    def dead_letters(self, limit: int = 1000) -> list[str]:
        """References of the jobs with a dead letter in Redis (``tenant/job_id``; ``poison-...`` for refused messages
        that name no job), newest first."""
        return self.book.dead_letters(limit)

    def ping(self, timeout: float = 30.0, engine: bool = False) -> dict[str, Any]:
        """Round-trip a no-op through the control (or engine) queue."""
        name, queue = (TASK_ENGINE_PING, ENGINE_QUEUE) if engine else (TASK_PING, CONTROL_QUEUE)
        return self.app.send_task(name, queue=queue).get(timeout=timeout)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        self.app.close()


def job_reference(job: Any) -> str:
    """``tenant/job_id`` of ``job``: a job model (or result) or a reference string; ``MalformedJobError`` for a bare
    job ID, which names no job on its own (job IDs are unique per tenant)."""
    if not isinstance(job, str):
        tenant, job_id = getattr(job, "tenant", None), getattr(job, "job_id", None)
        job = f"{tenant}/{job_id}"
    try:
        tenant, job_id = parse_job_ref(job)
    except ValueError as e:
        raise MalformedJobError(f"a job is named TENANT/JOB_ID: {e}") from None
    return f"{tenant}/{job_id}"


def _one_line(e: Exception) -> str:
    errs = getattr(e, "errors", None)
    if callable(errs):
        parts = [f"{'.'.join(map(str, x['loc'])) or 'manifest'}: {x['msg']}" for x in errs(include_input=False)]
        return "malformed manifest: " + "; ".join(parts[:5])
    return f"malformed manifest: {e}"


def _guess_format(uri: str) -> str:
    low = uri.lower()
    if low.endswith(".csv"):
        return "csv"
    if low.endswith(".jsonl") or low.endswith(".ndjson"):
        return "jsonl"
    if low.endswith("/"):
        return "prefix"
    raise MalformedJobError("cannot tell the manifest format from its name; pass --format csv|jsonl|prefix")


def dumps(result: Any) -> str:
    return json.dumps(result if isinstance(result, dict) else to_wire(result), indent=2, sort_keys=True, default=str)
