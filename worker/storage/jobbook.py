"""Job bookkeeping in Redis: attempt counters, fan-out progress, bulk cursors, finished results.

Everything here is idempotent so a re-delivered task can run it again:
- progress of a fan-out (revoke, bulk) is ``SADD`` of finished item IDs into per-state sets plus a ``total``; a
  chunk that runs twice adds the same members again and the counts do not move (no chords, nothing is lost when a
  callback would have been);
- "I am the last one" is decided by ``SET NX`` on a finaliser flag once done + failed == total, so exactly one
  chunk finalises even when two finish at the same moment;
- the attempt counter is ``INCR`` at task START, so a task that kills its worker process is counted too.

Only IDs, counts and error codes are stored: never seeds, embeddings, key material or image bytes.

Every method's ``job_id`` is the job's *reference* ``{tenant}/{job_id}`` (``worker.contracts.job_ref``; a
continuation's attempts: ``{tenant}/{job_id}-c{n}``): job IDs are chosen by producers and unique only within a
tenant, so two tenants' jobs with the same ID have separate records. Item IDs inside a fan-out job (subjects, child
job IDs) are plain: the parent's reference already names the tenant. Poison messages that name no job are recorded
under ``poison-<sha256 prefix>``. Key layout (``p`` = prefix from settings, default ``cf``; ``ref`` = job reference)::

    {p}:attempts:{ref}               int, INCR per start of the job's task
    {p}:submitted:{ref}              time a producer queued the job (so ``status`` tells queued from unknown)
    {p}:result:{ref}                 JSON result of a finished job (idempotent replay)
    {p}:job:{ref}                    hash: kind, total, state, created, updated, (bulk: cursor, resume_index,
                                     resume_offset, resume_lines, header_bytes, resume_key), ...
    {p}:job:{ref}:succeeded          set of item IDs
    {p}:job:{ref}:failed             hash item ID -> error code
    {p}:job:{ref}:errors             hash item ID -> JSON {line, subject, code, message} (bulk: the report's rows)
    {p}:job:{ref}:subjects           hash subject -> first manifest line (bulk, while streaming; then deleted)
    {p}:job:{ref}:final              SET NX flag: who finalises
    {p}:jobs:open                    set of open fan-out job references (for progress metrics)
    {p}:deadletter                   list of dead-lettered job references (newest first)
    {p}:erased:{ref}                 tombstone: an erasure removed this job's records (its re-delivery is refused)

Erasure (``erase_subject``, ``erase_tenant``) finds the records by ``SCAN`` over the tenant's references
(``{p}:*:{tenant}/*``) rather than a per-subject index: it covers records written before erasure existed, costs
nothing on the enrol path, and erasures are rare; its cost is one pass over the keyspace (``SCAN COUNT 1000``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

JOB_TTL_S = 30 * 24 * 3600


@dataclass(frozen=True)
class JobProgress:
    """Counts of a fan-out job by state (what ``cancelable status`` prints)."""

    job_id: str
    kind: str
    state: str
    total: int | None
    succeeded: int
    failed: int
    failed_codes: dict[str, int]
    extra: dict[str, str]

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    @property
    def pending(self) -> int | None:
        return None if self.total is None else max(self.total - self.done, 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "state": self.state,
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "pending": self.pending,
            "failed_codes": self.failed_codes,
            **{k: v for k, v in self.extra.items() if k not in ("kind", "state", "total")},
        }


class JobBook:
    """Redis bookkeeping for one deployment (``prefix`` separates deployments sharing a Redis)."""

    def __init__(self, redis: Any, prefix: str = "cf", ttl_s: int = JOB_TTL_S) -> None:
        self.r = redis
        self.p = prefix
        self.ttl = ttl_s

    # --- keys --------------------------------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return ":".join((self.p, *parts))

    # --- attempts ----------------------------------------------------------------------------------------------
    def start_attempt(self, job_id: str) -> int:
        """Count one more start of ``job_id``'s task; returns the attempt number (1 on first start)."""
        key = self._k("attempts", job_id)
        pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, self.ttl)
        n, _ = pipe.execute()
        return int(n)

    def give_back_attempt(self, job_id: str) -> None:
        """Undo ``start_attempt`` for a delivery that ended cleanly with a transient fault (it will be retried)."""
        self.r.decr(self._k("attempts", job_id))

    def transient_since(self, job_id: str) -> float:
        """Epoch seconds of ``job_id``'s first transient failure (recorded now if this is the first)."""
        key = self._k("transient", job_id)
        self.r.set(key, repr(time.time()), nx=True, ex=self.ttl)
        v = self.r.get(key)
        return float(v) if v is not None else time.time()

    def attempts(self, job_id: str) -> int:
        v = self.r.get(self._k("attempts", job_id))
        return int(v) if v is not None else 0

    # --- submissions (producer side) -----------------------------------------------------------------------------
    def mark_submitted(self, job_id: str) -> None:
        """A producer queued ``job_id`` (kept as long as results are)."""
        self.r.set(self._k("submitted", job_id), f"{time.time():.3f}", ex=self.ttl)

    _MARK_SUBMITTED = b"""
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2])
end
return #KEYS
"""
    _MARK_BATCH = 1000  # keys per script call

    def mark_submitted_many(self, job_ids: list[str]) -> None:
        """``mark_submitted`` for many jobs in one round trip: one script call per 1,000 jobs (one reply each, not
        one per job), packed by hand (``worker.storage.resp``)."""
        from worker.storage import resp

        if not job_ids:
            return
        tail = (f"{time.time():.3f}".encode(), str(self.ttl).encode())
        prefix = self._k("submitted", "")
        cmds = []
        for i in range(0, len(job_ids), self._MARK_BATCH):
            part = job_ids[i : i + self._MARK_BATCH]
            head = (b"EVAL", self._MARK_SUBMITTED, str(len(part)).encode())
            cmds.append(resp.pack_with(head, [(prefix + j).encode() for j in part], len(part), tail))
        resp.execute(self.r, cmds)

    def submitted_at(self, job_id: str) -> float | None:
        v = self.r.get(self._k("submitted", job_id))
        return float(v) if v is not None else None

    # --- finished results --------------------------------------------------------------------------------------
    def save_result(self, job_id: str, result: dict[str, Any]) -> None:
        self.r.set(self._k("result", job_id), json.dumps(result, sort_keys=True), ex=self.ttl)

    def get_result(self, job_id: str) -> dict[str, Any] | None:
        v = self.r.get(self._k("result", job_id))
        return json.loads(v) if v is not None else None

    # --- fan-out progress --------------------------------------------------------------------------------------
    def open_job(self, job_id: str, kind: str, **fields: str | int) -> None:
        """Create the job record if absent (a re-delivered parent keeps the original ``created``)."""
        key = self._k("job", job_id)
        now = f"{time.time():.3f}"
        pipe = self.r.pipeline()
        pipe.hsetnx(key, "kind", kind)
        pipe.hsetnx(key, "state", "running")
        pipe.hsetnx(key, "created", now)
        pipe.hset(key, "updated", now)
        for k, v in fields.items():
            pipe.hset(key, k, str(v))
        pipe.expire(key, self.ttl)
        pipe.sadd(self._k("jobs", "open"), job_id)
        pipe.execute()

    def close_job(self, job_id: str, state: str) -> None:
        """Terminal state (succeeded / failed / dead_lettered); the job leaves the open set."""
        self.set_fields(job_id, state=state)
        self.r.srem(self._k("jobs", "open"), job_id)

    def open_jobs(self, limit: int = 1000) -> list[str]:
        return [_s(x) for x in self.r.srandmember(self._k("jobs", "open"), limit) or []]

    def set_fields(self, job_id: str, **fields: str | int) -> None:
        key = self._k("job", job_id)
        self.r.hset(key, mapping={**{k: str(v) for k, v in fields.items()}, "updated": f"{time.time():.3f}"})
        self.r.expire(key, self.ttl)

    def get_fields(self, job_id: str) -> dict[str, str]:
        raw = self.r.hgetall(self._k("job", job_id))
        return {_s(k): _s(v) for k, v in raw.items()}

    def set_total(self, job_id: str, total: int) -> None:
        self.set_fields(job_id, total=int(total))

    def mark_succeeded(self, job_id: str, item_ids: list[str]) -> None:
        if not item_ids:
            return
        pipe = self.r.pipeline()
        pipe.sadd(self._k("job", job_id, "succeeded"), *item_ids)
        pipe.hdel(self._k("job", job_id, "failed"), *item_ids)
        pipe.expire(self._k("job", job_id, "succeeded"), self.ttl)
        pipe.execute()

    def mark_failed(self, job_id: str, failures: dict[str, str]) -> None:
        """item ID -> error code. An item that already succeeded stays succeeded."""
        if not failures:
            return
        ok = self.r.smismember(self._k("job", job_id, "succeeded"), list(failures))
        todo = {k: v for (k, v), was_ok in zip(failures.items(), ok, strict=True) if not was_ok}
        if todo:
            self.r.hset(self._k("job", job_id, "failed"), mapping=todo)
            self.r.expire(self._k("job", job_id, "failed"), self.ttl)

    def mark_failed_rows(self, job_id: str, details: dict[str, dict[str, Any]]) -> None:
        """``mark_failed`` with the details a bulk report lists: item ID -> {line, subject, code, message} (any of
        line and subject may be missing). The details are written first, so a counted failure always has them."""
        if not details:
            return
        key = self._k("job", job_id, "errors")
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, mapping={k: json.dumps(v, sort_keys=True) for k, v in details.items()})
        pipe.expire(key, self.ttl)
        pipe.execute()
        self.mark_failed(job_id, {k: str(v["code"]) for k, v in details.items()})

    def error_details(self, job_id: str, item_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The details ``mark_failed_rows`` kept for ``item_ids`` (those without any are left out)."""
        if not item_ids:
            return {}
        vals = self.r.hmget(self._k("job", job_id, "errors"), item_ids)
        return {k: json.loads(v) for k, v in zip(item_ids, vals, strict=True) if v is not None}

    _CLAIM_SUBJECTS = """
local out = {}
for i = 2, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  out[#out + 1] = redis.call('HGET', KEYS[1], ARGV[i])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return out
"""

    def claim_subjects(self, job_id: str, pairs: list[tuple[str, int]]) -> list[int]:
        """For each (subject, manifest line) in order: the first line recorded for that subject in this bulk job
        (this line if it is the first), in one round trip. A row sent again claims its own line again (idempotent)."""
        if not pairs:
            return []
        args = [x for subject, line in pairs for x in (subject, str(int(line)))]
        out = self.r.eval(self._CLAIM_SUBJECTS, 1, self._k("job", job_id, "subjects"), str(self.ttl), *args)
        return [int(_s(x)) for x in out]

    def forget_subjects(self, job_id: str) -> None:
        """The listing is done: the subjects' first lines are no longer needed."""
        self.r.delete(self._k("job", job_id, "subjects"))

    def set_item_info(self, job_id: str, item_id: str, info: dict[str, Any]) -> None:
        """Per-item outcome details for the finaliser (IDs, versions and URIs only)."""
        key = self._k("job", job_id, "items")
        self.r.hset(key, item_id, json.dumps(info, sort_keys=True))
        self.r.expire(key, self.ttl)

    def item_info(self, job_id: str) -> dict[str, dict[str, Any]]:
        raw = self.r.hgetall(self._k("job", job_id, "items"))
        return {_s(k): json.loads(v) for k, v in raw.items()}

    def failures(self, job_id: str, limit: int = 1000) -> dict[str, str]:
        """item ID -> error code (at most ``limit`` entries)."""
        out: dict[str, str] = {}
        for k, v in self.r.hscan_iter(self._k("job", job_id, "failed"), count=200):
            out[_s(k)] = _s(v)
            if len(out) >= limit:
                break
        return out

    def push_chunk(self, job_id: str, index: int, payload: dict[str, Any]) -> None:
        """Remember a fan-out chunk (so a re-delivered parent can re-send it without listing again)."""
        key = self._k("job", job_id, "chunks")
        self.r.hset(key, str(index), json.dumps(payload, sort_keys=True))
        self.r.expire(key, self.ttl)

    def chunks(self, job_id: str) -> list[dict[str, Any]]:
        raw = self.r.hgetall(self._k("job", job_id, "chunks"))
        return [json.loads(v) for _, v in sorted(((int(_s(k)), v) for k, v in raw.items()))]

    def unreported_children(self, job_id: str, children: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
        """Of ``children`` (item ID -> the child's job reference), those with a stored result that ``job_id`` has not
        counted (neither succeeded nor failed), with the result; one pipelined round trip."""
        pipe = self.r.pipeline()
        for cid, ref in children.items():
            pipe.sismember(self._k("job", job_id, "succeeded"), cid)
            pipe.hexists(self._k("job", job_id, "failed"), cid)
            pipe.get(self._k("result", ref))
        flat = pipe.execute()
        out = []
        for i, cid in enumerate(children):
            done, failed, raw = flat[3 * i : 3 * i + 3]
            if not done and not failed and raw is not None:
                out.append((cid, json.loads(raw)))
        return out

    def is_item_done(self, job_id: str, item_id: str) -> bool:
        return bool(self.r.sismember(self._k("job", job_id, "succeeded"), item_id))

    def claim_finaliser(self, job_id: str) -> bool:
        """True for exactly one caller once every item is accounted for."""
        p = self.progress(job_id)
        if p.total is None or p.done < p.total:
            return False
        return bool(self.r.set(self._k("job", job_id, "final"), "1", nx=True, ex=self.ttl))

    def progress(self, job_id: str) -> JobProgress:
        fields = self.get_fields(job_id)
        pipe = self.r.pipeline()
        pipe.scard(self._k("job", job_id, "succeeded"))
        pipe.hvals(self._k("job", job_id, "failed"))
        succeeded, failed_vals = pipe.execute()
        codes: dict[str, int] = {}
        for c in failed_vals:
            codes[_s(c)] = codes.get(_s(c), 0) + 1
        total = fields.get("total")
        return JobProgress(
            job_id=job_id,
            kind=fields.get("kind", "unknown" if not fields else "?"),
            state=fields.get("state", "unknown"),
            total=int(total) if total is not None else None,
            succeeded=int(succeeded),
            failed=len(failed_vals),
            failed_codes=codes,
            extra=fields,
        )

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self._k("job", job_id)))

    # --- bulk cursor ---------------------------------------------------------------------------------------------
    def get_cursor(self, job_id: str) -> int:
        v = self.r.hget(self._k("job", job_id), "cursor")
        return int(v) if v is not None else 0

    def set_cursor(self, job_id: str, cursor: int) -> None:
        """Only ever moves forward (a stale re-delivered bulk task cannot rewind another's progress)."""
        key = self._k("job", job_id)
        self.r.eval(
            "local c = tonumber(redis.call('HGET', KEYS[1], 'cursor') or '-1') "
            "if tonumber(ARGV[1]) > c then redis.call('HSET', KEYS[1], 'cursor', ARGV[1]) end return 1",
            1,
            key,
            int(cursor),
        )

    _ADVANCE_BULK = """
local c = tonumber(redis.call('HGET', KEYS[1], 'cursor') or '-1')
if tonumber(ARGV[1]) > c then redis.call('HSET', KEYS[1], 'cursor', ARGV[1]) c = tonumber(ARGV[1]) end
redis.call('HSET', KEYS[1], 'enqueued', string.format('%d', c), 'rows_seen', ARGV[1], 'updated', ARGV[2])
if ARGV[3] ~= '' then
  local r = tonumber(redis.call('HGET', KEYS[1], 'resume_index') or '-1')
  local l = tonumber(redis.call('HGET', KEYS[1], 'resume_lines') or '-1')
  if tonumber(ARGV[3]) > r or (tonumber(ARGV[3]) == r and tonumber(ARGV[5]) > l) then
    redis.call('HSET', KEYS[1], 'resume_index', ARGV[3], 'resume_offset', ARGV[4], 'resume_lines', ARGV[5],
               'header_bytes', ARGV[6], 'resume_key', ARGV[8])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[7])
return c
"""

    def advance_bulk(
        self, job_id: str, cursor: int, resume: tuple[int, int, int, int] | None, resume_key: str = ""
    ) -> int:
        """After a bulk chunk, in one round trip: the cursor (items sent) moves forward only; ``enqueued`` and
        ``rows_seen`` follow; ``resume`` = (item index, byte offset, physical lines, CSV header bytes) of the last
        point a continuation can start reading from (forward only: a later item, or the same item further in); for a
        prefix manifest, ``resume_key`` is the
        last object key listed at that point (the continuation lists after it). Returns the cursor."""
        r = ("", "", "", "") if resume is None else tuple(str(int(x)) for x in resume)
        return int(
            self.r.eval(
                self._ADVANCE_BULK,
                1,
                self._k("job", job_id),
                int(cursor),
                f"{time.time():.3f}",
                *r,
                self.ttl,
                resume_key,
            )
        )

    # --- dead letters --------------------------------------------------------------------------------------------
    def add_dead_letter(self, job_id: str, record: dict[str, Any]) -> None:
        pipe = self.r.pipeline()
        pipe.set(self._k("deadletter", job_id), json.dumps(record, sort_keys=True), ex=self.ttl)
        pipe.lrem(self._k("deadletter"), 0, job_id)
        pipe.lpush(self._k("deadletter"), job_id)
        pipe.execute()

    def get_dead_letter(self, job_id: str) -> dict[str, Any] | None:
        v = self.r.get(self._k("deadletter", job_id))
        return json.loads(v) if v is not None else None

    def clear_for_redrive(self, job_id: str) -> None:
        """Forget a dead-lettered job's result, attempts and dead letter so that it can be queued again under the
        same job ID (``cancelable redrive``). The S3 dead letter stays as the record of what happened."""
        pipe = self.r.pipeline()
        for kind in ("result", "attempts", "transient", "deadletter"):
            pipe.delete(self._k(kind, job_id))
        pipe.lrem(self._k("deadletter"), 0, job_id)
        pipe.execute()

    def dead_letters(self, limit: int = 100) -> list[str]:
        return [_s(x) for x in self.r.lrange(self._k("deadletter"), 0, limit - 1)]

    # --- erasure ---------------------------------------------------------------------------------------------------
    def _tenant_keys(self, tenant: str) -> list[str]:
        """Every job-book key of the tenant's jobs, and Celery result keys of its job references."""
        out = [_s(k) for k in self.r.scan_iter(match=f"{self.p}:*:{tenant}/*", count=1000)]
        out += [_s(k) for k in self.r.scan_iter(match=f"celery-task-meta-{tenant}/*", count=1000)]
        return out

    def _ref_of(self, key: str) -> tuple[str, str, str] | None:
        """(kind, job reference, suffix) of a job-book key ``{p}:{kind}:{ref}[:{suffix}]``; None for other keys."""
        if key.startswith("celery-task-meta-"):
            return "celery", key[len("celery-task-meta-") :], ""
        if not key.startswith(self.p + ":"):
            return None
        kind, _, rest = key[len(self.p) + 1 :].partition(":")
        ref, _, suffix = rest.partition(":")
        return kind, ref, suffix

    def _drop_refs(self, refs: set[str], keys: list[str]) -> int:
        """Delete every key of the job references ``refs`` (continuations ``{ref}-c{n}`` included) and leave a
        tombstone per reference."""
        doomed = []
        for k in keys:
            parsed = self._ref_of(k)
            if parsed is None or parsed[0] == "erased":
                continue
            if parsed[1] in refs or _base_ref(parsed[1]) in refs:
                doomed.append(k)
        pipe = self.r.pipeline(transaction=False)
        for k in doomed:
            pipe.delete(k)
        for ref in refs:
            pipe.lrem(self._k("deadletter"), 0, ref)
            pipe.srem(self._k("jobs", "open"), ref)
            pipe.set(self._k("erased", ref), "1", ex=self.ttl)
        pipe.execute()
        return len(doomed)

    def forget_job(self, job_id: str) -> None:
        """Remove every record of one job (an erasure overtook it) and leave its tombstone."""
        keys = [self._k(kind, job_id) for kind in ("attempts", "submitted", "transient", "result", "deadletter", "job")]
        keys += [self._k("job", job_id, s) for s in ("succeeded", "failed", "items", "chunks", "final")]
        self._drop_refs({job_id}, keys)

    def was_erased(self, job_id: str) -> bool:
        """An erasure removed this job's records (a re-delivered message of it must not write again)."""
        return bool(self.r.exists(self._k("erased", job_id)))

    def erase_subject(self, tenant: str, subject: str, placeholder: str, also_jobs: set[str] | None = None) -> int:
        """Remove every record naming ``subject`` of ``tenant``: the whole record family (result, attempts,
        submission, job hash and sets, dead letter) of each job whose result, job hash or dead letter names it;
        inside other jobs (a key revocation's progress sets, item details and saved chunks) the subject is replaced
        by ``placeholder`` so counts stay right. ``also_jobs``: job IDs known (from S3) to have written for the subject,
        treated the same. Returns the number of keys deleted or rewritten."""
        keys = self._tenant_keys(tenant)
        refs: set[str] = {f"{tenant}/{j}" for j in also_jobs or ()}
        fanout: list[tuple[str, str]] = []
        for k in keys:
            parsed = self._ref_of(k)
            if parsed is None:
                continue
            kind, ref, suffix = parsed
            if kind in ("result", "deadletter", "celery") and not suffix:
                raw = self.r.get(k)
                if raw is not None and _json_names(raw, subject):
                    refs.add(ref)
            elif kind == "job" and not suffix:
                if _s(self.r.hget(k, "subject") or b"") == subject:
                    refs.add(ref)
            elif kind == "job" and suffix in ("succeeded", "failed", "items", "chunks"):
                fanout.append((k, suffix))
        n = self._drop_refs(refs, keys)
        for k, suffix in fanout:
            n += self._replace_item(k, suffix, subject, placeholder)
        return n

    def _replace_item(self, key: str, suffix: str, subject: str, placeholder: str) -> int:
        if suffix == "succeeded":
            if self.r.srem(key, subject):
                self.r.sadd(key, placeholder)
                return 1
            return 0
        if suffix in ("failed", "items"):
            v = self.r.hget(key, subject)
            if v is None:
                return 0
            self.r.hdel(key, subject)
            self.r.hset(key, placeholder, "{}" if suffix == "items" else v)
            return 1
        n = 0
        for idx, raw in self.r.hgetall(key).items():
            payload = json.loads(raw)
            subjects = payload.get("subjects")
            if isinstance(subjects, list) and subject in subjects:
                payload["subjects"] = [placeholder if x == subject else x for x in subjects]
                self.r.hset(key, idx, json.dumps(payload, sort_keys=True))
                n += 1
        return n

    def erase_tenant(self, tenant: str, keep: str | None = None) -> int:
        """Remove every record of the tenant's jobs (all but job reference ``keep``: the erasing job's own)."""
        keys = self._tenant_keys(tenant)
        refs = set()
        for k in keys:
            parsed = self._ref_of(k)
            if parsed is not None and parsed[0] != "erased" and _base_ref(parsed[1]) != keep:
                refs.add(parsed[1])
        n = self._drop_refs(refs, keys)
        for ref in [_s(x) for x in self.r.lrange(self._k("deadletter"), 0, -1)]:
            if ref.startswith(f"{tenant}/"):
                self.r.lrem(self._k("deadletter"), 0, ref)
        return n


def _base_ref(ref: str) -> str:
    """The job reference of a continuation's reference ``{ref}-c{n}`` (else ``ref`` itself)."""
    return re.sub(r"-c[0-9]+$", "", ref)


def _json_names(raw: Any, subject: str) -> bool:
    """A stored JSON record (result, dead letter with its job, Celery result) whose subject is ``subject``."""
    try:
        d = json.loads(raw)
    except (ValueError, TypeError):
        return False
    if not isinstance(d, dict):
        return False
    for obj in (d, d.get("job"), d.get("result")):
        if isinstance(obj, dict):
            subs = obj.get("subjects")
            if obj.get("subject") == subject or (isinstance(subs, list) and subject in subs):
                return True
    return False


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
