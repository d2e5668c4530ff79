"""``cancelable``: queue jobs and read their results from the command line (entry point ``producers.cli:main``).

    cancelable enroll  --tenant T --subject S --key K s3://b/a.jpg s3://b/b.jpg
    cancelable verify  --tenant T --subject S s3://b/probe.jpg
    cancelable revoke  --tenant T --subject S --reason "leaked"          (or --key K --new-key K2)
    cancelable bulk    --tenant T --key K manifest.csv|s3://b/m.jsonl|s3://b/prefix/ [--format prefix]
    cancelable status  JOB_ID

Every job subcommand also takes ``--job-file FILE`` (a job as JSON, ``-`` for stdin) instead of the flags,
``--job-id`` (choose the ID: re-running with the same ID returns the existing result or resumes a bulk job),
``--no-wait`` (print the job ID and exit) and ``--json`` (print the result as JSON).

Exit status: 0 job succeeded, 1 job failed or dead-lettered, 2 bad input (nothing queued), 3 timed out waiting,
4 cannot reach Redis / S3. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_TIMEOUT, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        raise CliError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cancelable", description="Queue cancelable-biometrics jobs and read their results.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--job-file", help="the job as JSON (a file, or - for stdin) instead of the flags")
        sp.add_argument("--job-id", help="job ID (8-128 chars of [A-Za-z0-9_-]); default: a random UUID")
        sp.add_argument("--no-wait", action="store_true", help="queue and print the job ID, do not wait")
        sp.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the result (900)")
        sp.add_argument("--json", action="store_true", help="print the result as JSON")

    e = sub.add_parser("enroll", help="enrol a subject from S3 images under a key")
    e.add_argument("--tenant")
    e.add_argument("--subject")
    e.add_argument("--key", dest="key_id")
    e.add_argument("images", nargs="*", help="s3://bucket/key of each source image")
    common(e)

    v = sub.add_parser("verify", help="verify a probe image against a subject's current template")
    v.add_argument("--tenant")
    v.add_argument("--subject")
    v.add_argument("--threshold", type=float)
    v.add_argument("probe", nargs="?", help="s3://bucket/key of the probe image")
    common(v)

    r = sub.add_parser("revoke", help="revoke a subject's template, or a whole key, and reissue")
    r.add_argument("--tenant")
    r.add_argument("--subject")
    r.add_argument("--key", dest="key_id", help="revoke this whole key (needs --new-key)")
    r.add_argument("--new-key", dest="new_key_id")
    r.add_argument("--reason")
    r.add_argument("--purge", action="store_true", help="delete the revoked version's cancelable images")
    common(r)

    b = sub.add_parser("bulk", help="enrol every subject listed in a manifest (CSV, JSONL or an S3 prefix)")
    b.add_argument("--tenant")
    b.add_argument("--key", dest="key_id", help="default key for rows that name none")
    b.add_argument("--format", choices=["csv", "jsonl", "prefix"])
    b.add_argument("--naming-rule", help="prefix manifests: regex with a (?P<subject>...) group")
    b.add_argument("--chunk-size", type=int)
    b.add_argument("manifest", nargs="?", help="local file, s3://bucket/key.csv|.jsonl or s3://bucket/prefix/")
    common(b)

    s = sub.add_parser("status", help="state and counts by state of a job (bulk and revoke: progress)")
    s.add_argument("job_id")
    s.add_argument("--json", action="store_true")
    return p


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
    data.setdefault("job_id", __import__("uuid").uuid4().hex)
    return data


def _build_job(client: Any, args: argparse.Namespace) -> Any:
    if args.job_file:
        return client.validate(_job_from_file(args.job_file, args.command, args.job_id))
    if args.command == "enroll":
        _require(args, "tenant", "subject", "key_id", "images")
        return client.enroll_job(args.tenant, args.subject, args.images, args.key_id, job_id=args.job_id)
    if args.command == "verify":
        _require(args, "tenant", "subject", "probe")
        return client.verify_job(args.tenant, args.subject, args.probe, args.threshold, job_id=args.job_id)
    if args.command == "revoke":
        _require(args, "tenant", "reason")
        return client.revoke_job(
            args.tenant,
            args.reason,
            subject=args.subject,
            key_id=args.key_id,
            new_key_id=args.new_key_id,
            purge_old_images=args.purge,
            job_id=args.job_id,
        )
    _require(args, "tenant", "key_id", "manifest")
    return client.bulk_job(
        args.tenant, args.key_id, args.manifest, args.format, args.naming_rule, args.chunk_size, job_id=args.job_id
    )


def _summary(res: Any) -> str:
    d = res if isinstance(res, dict) else res.model_dump(mode="json")
    kind, status = d.get("kind"), d.get("status")
    head = f"{kind} {d.get('job_id')}: {status}"
    if d.get("error") and kind not in ("bulk", "revoke"):
        return f"{head} ({d['error']['code']}: {d['error']['message']})"
    if d.get("error"):
        head += f" ({d['error']['code']}: {d['error']['message']})"
    if kind == "enroll":
        return (
            f"{head}; version {d['version']} of {d['tenant']}/{d['subject']} (key {d['key_id']} v{d['key_version']}"
            f"{', existing' if d.get('created') is False else ''})\n  manifest {d['manifest_uri']}\n  template "
            f"{d['template_uri']}" + "".join(f"\n  image    {u}" for u in d.get("image_uris", []))
        )
    if kind == "verify":
        return (
            f"{head}; score {d['score']:.4f} vs threshold {d['threshold']:.4f} -> {d['decision'].upper()} "
            f"(template version {d['version']}, key {d['key_id']} v{d['key_version']})"
        )
    if kind == "revoke":
        extra = ""
        if d.get("subject"):
            extra = (
                f"; revoked versions {d.get('revoked_versions')} -> new version {d.get('new_version')} "
                f"(key {d.get('new_key_id')} v{d.get('new_key_version')})\n  manifest {d.get('manifest_uri')}"
            )
        return (
            f"{head}; subjects {d['subjects_done']}/{d['subjects_total']} reissued, {d['subjects_failed']} failed"
            + extra
        )
    if kind == "bulk":
        return f"{head}; {d['succeeded']} succeeded, {d['failed']} failed of {d['total']}" + (
            f"; errors {d['errors_by_code']}" if d.get("errors_by_code") else ""
        )
    return head


def _progress_bar(desc: str) -> tuple[Any, Any]:
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="item", total=None, file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(p: Any) -> None:
        if p.total is not None and bar.total != p.total:
            bar.total = p.total
            bar.refresh()
        if p.done > bar.n:
            bar.update(p.done - bar.n)
        bar.set_postfix(failed=p.failed, refresh=False)

    return bar, update


def _run_job(client: Any, args: argparse.Namespace) -> int:
    from producers.client import JobTimeout

    job = _build_job(client, args)
    job_id = client.submit(job)
    if args.no_wait:
        print(job_id)
        return EXIT_OK
    bar = None
    update = None
    if job.kind in ("bulk", "revoke") and not args.json:
        bar, update = _progress_bar(f"{job.kind} {job_id[:12]}")
    try:
        res = client.wait(job_id, timeout=args.timeout, on_progress=update)
    except JobTimeout as e:
        raise CliError(f"{e}; check later with: cancelable status {job_id}", EXIT_TIMEOUT) from None
    finally:
        if bar is not None:
            bar.close()
    d = res if isinstance(res, dict) else res.model_dump(mode="json")
    print(json.dumps(d, indent=2, sort_keys=True) if args.json else _summary(res))
    return EXIT_OK if d.get("status") == "succeeded" else EXIT_FAILED


def _status(client: Any, args: argparse.Namespace) -> int:
    from worker.contracts import check_job_id

    try:
        check_job_id(args.job_id)
    except ValueError as e:
        raise CliError(f"cancelable status: {e}") from None
    st = client.status(args.job_id)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True, default=str))
        return EXIT_OK
    print(f"job {args.job_id}: {st['state']} (attempts {st['attempts']})")
    p = st.get("progress")
    if p:
        total = "?" if p["total"] is None else p["total"]
        print(
            f"  {p['kind']}: total {total}, succeeded {p['succeeded']}, failed {p['failed']}, pending "
            f"{'?' if p['pending'] is None else p['pending']}"
        )
        for code, n in sorted(p["failed_codes"].items()):
            print(f"    failed {code}: {n}")
    if "dead_letter" in st:
        print(f"  dead-lettered: {st['dead_letter']}")
    if "result" in st:
        print("  " + _summary(st["result"]).replace("\n", "\n  "))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _dispatch(args)
    except CliError as e:
        print(f"cancelable: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cancelable: interrupted (queued jobs keep running; see `cancelable status`)", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from worker.errors import CancelableError, MalformedJobError
    from worker.settings import SettingsError

    try:
        from producers.client import Client

        client = Client()
    except SettingsError as e:
        raise CliError(str(e).replace("\n", " ")) from None
    try:
        if args.command == "status":
            return _status(client, args)
        return _run_job(client, args)
    except MalformedJobError as e:
        raise CliError(str(e)) from None
    except CancelableError as e:
        raise CliError(f"{e.code}: {e}", EXIT_UNAVAILABLE if e.retryable else EXIT_BAD_INPUT) from None
    except Exception as e:  # redis / kombu connection problems
        name = type(e).__name__
        if "Connection" in name or "Timeout" in name or "OperationalError" in name:
            raise CliError(
                f"cannot reach the queue ({name}); is the stack up? (infra/stack.sh up)", EXIT_UNAVAILABLE
            ) from None
        raise
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
