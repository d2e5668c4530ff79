"""What each ``cancelable`` subcommand does, given a ``Client`` and the parsed arguments (``producers.cli`` parses)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

from producers.render import as_dict, result_summary, status_summary, subject_summary

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_TIMEOUT, EXIT_UNAVAILABLE, EXIT_REJECT, EXIT_NOT_FOUND = 0, 1, 2, 3, 4, 5, 6
EXIT_BY_NAME = {
    "ok": EXIT_OK,
    "failed": EXIT_FAILED,
    "bad_input": EXIT_BAD_INPUT,
    "timeout": EXIT_TIMEOUT,
    "unavailable": EXIT_UNAVAILABLE,
    "reject": EXIT_REJECT,
    "not_found": EXIT_NOT_FOUND,
}


class CliError(Exception):
    """One line for stderr and the exit status."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = code


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [n for n in names if getattr(args, n, None) in (None, [], "")]
    if missing:
        flags = ", ".join(
            "--" + n.replace("_id", "").replace("_", "-") if n != "images" else "IMAGE..." for n in missing
        )
        raise CliError(f"cancelable {args.command}: missing {flags} (or give --job-file)")


def _job_from_file(path: str, kind: str, job_id: str | None) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
        data = json.loads(text)
    except OSError as e:
        raise CliError(f"cannot read job file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise CliError(f"job file {path} is not JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict):
        raise CliError(f"job file {path} must hold one JSON object")
    data.setdefault("kind", kind)
    if data["kind"] != kind:
        raise CliError(f"job file {path} holds a {data['kind']!r} job, not {kind!r}")
    if job_id:
        data["job_id"] = job_id
    data.setdefault("job_id", uuid.uuid4().hex)
    return data


def _local_refs(client: Any, tenant: str | None, refs: list[str]) -> tuple[list[str], list[Any]]:
    """Local paths in ``refs`` -> the ``s3://`` references they get (files checked, nothing uploaded yet)."""
    from producers.uploads import is_local

    if tenant is None or not any(is_local(r) for r in refs):
        return refs, []
    checked = [client.local_image(tenant, r) if is_local(r) else r for r in refs]
    return [x if isinstance(x, str) else x.uri for x in checked], [x for x in checked if not isinstance(x, str)]


def _build_job(client: Any, args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The validated job, plus the local photos to upload before it is queued."""
    if args.job_file:
        return client.validate(_job_from_file(args.job_file, args.command, args.job_id)), []
    if args.command == "enroll":
        _require(args, "tenant", "subject", "key_id", "images")
        images, uploads = _local_refs(client, args.tenant, args.images)
        return client.enroll_job(args.tenant, args.subject, images, args.key_id, job_id=args.job_id), uploads
    if args.command == "verify":
        _require(args, "tenant", "subject", "probe")
        (probe,), uploads = _local_refs(client, args.tenant, [args.probe])
        job = client.verify_job(args.tenant, args.subject, probe, args.threshold, job_id=args.job_id, far=args.far)
        return job, uploads
    if args.command == "revoke":
        _require(args, "tenant", "reason")
        job = client.revoke_job(
            args.tenant,
            args.reason,
            subject=args.subject,
            key_id=args.key_id,
            new_key_id=args.new_key_id,
            purge_old_images=args.purge,
            job_id=args.job_id,
        )
        return job, []
    if args.command == "erase":
        _require(args, "tenant", "reason")
        if (args.subject is None) == (not args.all_subjects):
            raise CliError("cancelable erase: give --subject S, or --all-subjects --confirm TENANT")
        if args.all_subjects and args.confirm != args.tenant:
            raise CliError("cancelable erase: --all-subjects needs --confirm repeating the tenant ID")
        job = client.erase_job(
            args.tenant,
            args.reason,
            subject=args.subject,
            all_subjects=args.all_subjects,
            confirm=args.confirm,
            job_id=args.job_id,
        )
        return job, []
    _require(args, "tenant", "key_id", "manifest")
    from worker.errors import MalformedJobError

    try:
        job = client.bulk_job(
            args.tenant, args.key_id, args.manifest, args.format, args.naming_rule, args.chunk_size, job_id=args.job_id
        )
    except MalformedJobError as e:  # a local manifest's bad rows: one line each
        raise CliError(str(e)) from None
    return job, []


class _ProgressBar:
    """A bar on stderr, drawn once the job's total is known (``total`` up front: a one-subject revoke), so it never
    shows ``0item [00:00, ?item/s]``."""

    def __init__(self, desc: str, total: int | None) -> None:
        self.desc, self.bar = desc, None
        if total is not None:
            self._open(total)

    def _open(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=self.desc, unit="item", total=total, file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(self, p: Any) -> None:
        if p.total is None:
            return
        if self.bar is None:
            self._open(p.total)
        bar = self.bar
        assert bar is not None
        if bar.total != p.total:
            bar.total = p.total
            bar.refresh()
        if p.done > bar.n:
            bar.update(p.done - bar.n)
        bar.set_postfix(failed=p.failed, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_job(client: Any, args: argparse.Namespace) -> int:
    """enroll / verify / revoke / bulk / erase: validate, upload local photos, queue, wait, print."""
    from producers.client import JobErased, JobTimeout

    job, uploads = _build_job(client, args)  # every check before the first upload
    if uploads:
        client.redis.ping()  # the queue first: no photo is uploaded for a job that cannot be queued
    out = sys.stderr if args.json or args.no_wait else sys.stdout  # stdout: only what a script captures
    for img, uri in zip(uploads, client.upload(uploads), strict=True):
        print(f"uploaded {img.path} -> {uri}", file=out, flush=True)
    ref = client.submit(job)  # tenant/job_id: job IDs are unique per tenant
    if args.no_wait:
        print(ref)
        return EXIT_OK
    bar = update = None
    if job.kind in ("bulk", "revoke") and not args.json:
        one = job.kind == "revoke" and getattr(job, "subject", None) is not None
        bar = _ProgressBar(f"{job.kind} {job.job_id[:12]}", 1 if one else None)
        update = bar.update
    try:
        res = client.wait(ref, timeout=args.timeout, on_progress=update)
    except JobTimeout as e:
        raise CliError(f"{e}; check later with: cancelable status {ref}", EXIT_TIMEOUT) from None
    except JobErased as e:
        raise CliError(str(e), EXIT_FAILED) from None
    finally:
        if bar is not None:
            bar.close()
    d = as_dict(res)
    print(json.dumps(d, indent=2, sort_keys=True) if args.json else result_summary(res, _local_names(uploads)))
    if d.get("kind") == "bulk" and not args.json:
        _print_report_head(client, ref, d)
    if d.get("status") != "succeeded":
        return EXIT_BAD_INPUT if _refused_input(d) else EXIT_FAILED
    return EXIT_REJECT if d.get("kind") == "verify" and d.get("decision") == "reject" else EXIT_OK


def _refused_input(d: dict[str, Any]) -> bool:
    """A revocation the worker refused before changing anything because a key ID names no key (exit 2, bad input,
    like a refusal before queueing: the producer cannot know the worker's keys itself)."""
    err = d.get("error") or {}
    return d.get("kind") == "revoke" and err.get("code") == "unknown_key" and not d.get("subjects_total")


def _local_names(uploads: list[Any]) -> dict[str, str]:
    """``s3://`` reference of an uploaded photo -> the local path the user gave (for error messages)."""
    return {u.uri: str(u.path) for u in uploads}


def _print_report_head(client: Any, ref: str, d: dict[str, Any], n: int = 5) -> None:
    """The first failed rows of a finished bulk job (``ref``: tenant/job_id) and where its whole report is."""
    if not d.get("report_uri"):
        return
    if d.get("failed"):
        try:
            head = client.report_head(ref, n)
        except Exception:  # the URI below still says where the report is
            head = []
        for r in head:
            print(f"  line {r.get('line') or '?'}: {r.get('subject') or '-'}: {r.get('code')}: {r.get('message')}")
        if d["failed"] > len(head):
            print(f"  ... {d['failed'] - len(head)} more failed rows")
    print(f"  report {d['report_uri']} (cancelable report {ref} --out FILE)")


def fetch_report(client: Any, args: argparse.Namespace) -> int:
    """Download a finished bulk job's report (JSONL or CSV) to ``--out`` (default: stdout)."""
    from worker.contracts import parse_job_ref

    given = args.report_job_id or args.job
    if not given:
        raise CliError("cancelable report: give the bulk job as TENANT/JOB_ID (or JOB_ID with --tenant)")
    ref = f"{args.tenant}/{given}" if getattr(args, "tenant", None) and "/" not in given else given
    try:
        parse_job_ref(ref)
    except ValueError as e:
        raise CliError(f"cancelable report: {e}") from None
    body = client.report(ref, args.format)
    if body is None:
        raise CliError(
            f"no report for job {ref}: not a bulk job, not finished yet, or unknown (cancelable status {ref})",
            EXIT_NOT_FOUND,
        )
    if args.out in (None, "-"):
        sys.stdout.write(body.decode("utf-8"))
        sys.stdout.flush()
    else:
        with open(args.out, "wb") as f:
            f.write(body)
        rows = body.count(b"\n") - (1 if args.format == "csv" else 0)
        print(f"{args.out}: {rows} failed rows ({args.format}) of bulk job {ref}", file=sys.stderr)
    return EXIT_OK


def upload_files(client: Any, args: argparse.Namespace) -> int:
    _require(args, "tenant")
    images = [client.local_image(args.tenant, f) for f in args.files]  # all checked before the first upload
    for uri in client.upload(images):
        print(uri)
    return EXIT_OK


def show_status(client: Any, args: argparse.Namespace) -> int:
    """``status TENANT/JOB_ID`` (what a queued job prints) or ``status JOB_ID --tenant TENANT``."""
    from worker.contracts import parse_job_ref

    ref = f"{args.tenant}/{args.job_id}" if args.tenant and "/" not in args.job_id else args.job_id
    try:
        parse_job_ref(ref)
    except ValueError as e:
        raise CliError(f"cancelable status: {e} (a job is named TENANT/JOB_ID, or JOB_ID --tenant TENANT)") from None
    st = client.status(ref)
    if st["state"] == "unknown":
        raise CliError(
            f"unknown job {ref}: never queued here, its records expired, or a fan-out child not started yet",
            EXIT_NOT_FOUND,
        )
    print(json.dumps(st, indent=2, sort_keys=True, default=str) if args.json else status_summary(ref, st))
    return EXIT_OK


def show_subject(client: Any, args: argparse.Namespace) -> int:
    state = client.subject(args.tenant, args.subject)
    if state is None:
        raise CliError(f"no subject {args.tenant}/{args.subject}: nothing enrolled", EXIT_NOT_FOUND)
    d = state.as_dict()
    print(json.dumps(d, indent=2, sort_keys=True) if args.json else subject_summary(d))
    return EXIT_OK


def index_keys(client: Any, args: argparse.Namespace) -> int:
    """Build the subject index of a tenant's keys (or one key) from the S3 records and mark it complete, so a key
    revocation lists its subjects from the index (docs/storage-layout.md, "The key subject index"). Reads every
    subject of the tenant (two requests each); safe to run again."""
    from worker.storage.keyindex import backfill_key_index

    t = time.perf_counter()
    n = backfill_key_index(client.store, args.tenant, args.key_id)
    which = f"key {args.key_id}" if args.key_id else "every key"
    print(
        f"key index of tenant {args.tenant}, {which}: {n} subjects indexed in {time.perf_counter() - t:.1f} s; "
        "marked complete"
    )
    return EXIT_OK


def redrive_jobs(client: Any, args: argparse.Namespace) -> int:
    """Queue dead-lettered jobs again (``Client.redrive``); prints one line per job. Exit 1 if any could not be."""
    ids = list(args.job_ids) + (client.dead_letters() if args.all_dead else [])
    if not ids:
        raise CliError("cancelable redrive: give job IDs or --all-dead")
    failed = 0
    for job_id in dict.fromkeys(ids):
        try:
            client.redrive(job_id)
            print(f"{job_id}: queued again")
        except Exception as e:  # one bad ID must not stop the others
            failed += 1
            print(f"{job_id}: not re-driven ({e})")
    return EXIT_FAILED if failed else EXIT_OK


def fetch_version(client: Any, args: argparse.Namespace) -> int:
    """Write a version's cancelable images, template record and manifest into ``args.dir`` (``producers.fetch``)."""
    from producers.fetch import fetch
    from worker.errors import NoTemplateError

    try:
        written = fetch(client, args.tenant, args.subject, args.version, args.dir, overwrite=args.force)
    except NoTemplateError as e:
        raise CliError(f"{e.code}: {e}", EXIT_NOT_FOUND) from None
    if args.json:
        print(json.dumps(written, indent=2, sort_keys=True))
        return EXIT_OK
    print(
        f"fetched version {written['version']} of {args.tenant}/{args.subject} (key {written['key_id']} "
        f"v{written['key_version']}) into {args.dir}"
    )
    for f in written["files"]:
        print(f"  {f}")
    return EXIT_OK
