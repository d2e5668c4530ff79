"""``cancelable``: queue jobs and read their results from the command line (entry point ``producers.cli:main``).

    cancelable enroll  --tenant T --subject S --key K a.jpg b.jpg            (local photos or s3://bucket/key refs)
    cancelable verify  --tenant T --subject S probe.jpg
    cancelable revoke  --tenant T --subject S --reason "leaked"          (or --key K --new-key K2)
    cancelable bulk    --tenant T --key K manifest.csv|s3://b/m.jsonl|s3://b/prefix/ [--format prefix]
    cancelable upload  --tenant T a.jpg b.jpg                           (prints one s3:// reference per photo)
    cancelable status  JOB_ID
    cancelable subject TENANT SUBJECT

Local photos are uploaded to the tenant's input prefix, ``s3://$CANCELABLE_S3__INPUT_BUCKET/tenants/T/uploads/``,
before the job is queued (each upload is printed). Every job subcommand also takes ``--job-file FILE``,
``--job-id``, ``--no-wait`` and ``--json``. Exit codes: ``EXIT_CODES`` (also in ``--help``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from producers.commands import (
    EXIT_BAD_INPUT,
    EXIT_BY_NAME,
    EXIT_UNAVAILABLE,
    CliError,
    index_keys,
    redrive_jobs,
    run_job,
    show_status,
    show_subject,
    upload_files,
)

EXIT_CODES = "exit status:\n" + "\n".join(
    f"  {EXIT_BY_NAME[name]}  {text}"
    for name, text in [
        ("ok", "done: the job succeeded (verify: ACCEPT); status/subject: found"),
        ("failed", "the job failed or was dead-lettered (the error code is printed)"),
        ("bad_input", "bad input or configuration: nothing was queued"),
        ("timeout", "timed out waiting (the job may still finish: cancelable status JOB_ID)"),
        ("unavailable", "cannot reach Redis or S3"),
        ("reject", "verify ran and REJECTED the probe (score below the threshold)"),
        ("not_found", "status: unknown job ID; subject: nothing stored for that subject"),
    ]
)

MANIFEST_FORMATS = """manifest formats:
  csv     header `subject,image[,key_id]`, one image per row; consecutive rows of one subject form one
          enrolment (up to 64 images); key_id (optional) overrides --key for that row. Example:
              subject,image
              alice,s3://cancelable-inputs/tenants/acme/uploads/4f1c0b....jpg
              alice,s3://cancelable-inputs/tenants/acme/uploads/9a02e7....jpg
              bob,s3://cancelable-inputs/tenants/acme/uploads/77e3d1....jpg
  jsonl   one JSON object per line: {"subject": "alice", "images": ["s3://...", ...], "key_id": "k"}
          (key_id optional)
  prefix  s3://bucket/prefix/: its objects grouped by subject with --naming-rule, a regex with a
          (?P<subject>...) group matched against each key below the prefix; default <subject>/<file>.jpg|png|webp
Images in a manifest are s3:// references: upload local photos first with `cancelable upload`. A local
manifest file is uploaded for you; its format comes from its extension (.csv, .jsonl) or --format."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        raise CliError(f"{self.prog}: {message}")


def _sub(sub: Any, name: str, text: str, epilog: str = "") -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=text,
        description=text,
        epilog=(epilog + "\n\n" if epilog else "") + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return p


def _tenant(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--tenant", help="tenant ID (1-128 chars of [A-Za-z0-9._-]); separates storage and keys")


def _subject(sp: argparse.ArgumentParser, what: str) -> None:
    sp.add_argument("--subject", help=f"subject ID in the tenant (1-128 chars of [A-Za-z0-9._-]) {what}")


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--job-file", help="the job as JSON (a file, or - for stdin) instead of the flags")
    sp.add_argument("--job-id", help="job ID (8-128 chars of [A-Za-z0-9_-]); default: a random UUID")
    sp.add_argument("--no-wait", action="store_true", help="queue and print the job ID, do not wait")
    sp.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the result (900)")
    sp.add_argument("--json", action="store_true", help="print the result as JSON (uploads go to stderr)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="cancelable",
        description="Queue cancelable-biometrics jobs and read their results. Settings come from CANCELABLE_* "
        "variables (the local stack: `source .stack/env`).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    e = _sub(sub, "enroll", "enrol a subject from photos under a key (a new template version)")
    _tenant(e)
    _subject(e, "to enrol")
    e.add_argument("--key", dest="key_id", help="key ID the template is derived under (keyring name or KMS key)")
    e.add_argument("images", nargs="*", help="local photo files (uploaded first) or s3://bucket/key references")
    _common(e)

    v = _sub(sub, "verify", "verify a probe photo against a subject's current template")
    _tenant(v)
    _subject(v, "to verify against")
    how = v.add_mutually_exclusive_group()
    how.add_argument("--threshold", type=float, help="accept at or above this score (default: the worker's)")
    how.add_argument(
        "--far",
        type=float,
        help="decide at the bundle's calibrated threshold for this false-accept rate, e.g. 1e-3 (per enrolment size)",
    )
    v.add_argument("probe", nargs="?", help="a local photo file (uploaded first) or an s3://bucket/key reference")
    _common(v)

    r = _sub(sub, "revoke", "revoke a subject's template, or a whole key, and reissue under a new key version")
    _tenant(r)
    _subject(r, "to revoke (or give --key)")
    r.add_argument("--key", dest="key_id", help="revoke this whole key for the tenant (needs --new-key)")
    r.add_argument("--new-key", dest="new_key_id", help="key ID to reissue under (default: next version, same key)")
    r.add_argument("--reason", help="why (kept in the revocation record)")
    r.add_argument("--purge", action="store_true", help="delete the revoked version's cancelable images")
    _common(r)

    b = _sub(sub, "bulk", "enrol every subject listed in a manifest (CSV, JSONL or an S3 prefix)", MANIFEST_FORMATS)
    _tenant(b)
    b.add_argument("--key", dest="key_id", help="default key for rows that name none")
    b.add_argument("--format", choices=["csv", "jsonl", "prefix"], help="manifest format (default: from its name)")
    b.add_argument("--naming-rule", help="prefix manifests: regex with a (?P<subject>...) group")
    b.add_argument("--chunk-size", type=int, help="enrolments queued per step (default: the worker's)")
    b.add_argument("manifest", nargs="?", help="local file, s3://bucket/key.csv|.jsonl or s3://bucket/prefix/")
    _common(b)

    u = _sub(sub, "upload", "upload local photos to the tenant's input prefix; print one s3:// reference each")
    _tenant(u)
    u.add_argument("files", nargs="+", help="local JPEG, PNG or WebP photos")

    s = _sub(sub, "status", "state of a job (bulk and revoke: progress by state)")
    s.add_argument("job_id", help="the job ID printed when the job was queued")
    s.add_argument("--json", action="store_true", help="print the status as JSON")

    rd = _sub(sub, "redrive", "queue dead-lettered jobs again under their own job IDs")
    rd.add_argument("job_ids", nargs="*", metavar="job_id", help="dead-lettered job IDs to queue again")
    rd.add_argument("--all-dead", action="store_true", help="every dead-lettered job recorded in Redis")

    ix = _sub(
        sub,
        "index-keys",
        "operators: build a tenant's key subject index from S3 and mark it complete (once per tenant, after upgrade)",
    )
    ix.add_argument("index_tenant", metavar="tenant", help="tenant ID")
    ix.add_argument("key_id", nargs="?", help="one key only (default: every key of the tenant, present and future)")

    st = _sub(sub, "subject", "what is stored for a subject: current version, key version, revoked versions")
    st.add_argument("subject_tenant", metavar="tenant", help="tenant ID")
    st.add_argument("subject_id", metavar="subject", help="subject ID")
    st.add_argument("--json", action="store_true", help="print the state as JSON")
    return p


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
        handler = {
            "status": show_status,
            "subject": show_subject,
            "upload": upload_files,
            "redrive": redrive_jobs,
            "index-keys": index_keys,
        }.get(args.command, run_job)
        return handler(client, args)
    except (MalformedJobError, SettingsError) as e:
        raise CliError(str(e).replace("\n", " "), EXIT_BAD_INPUT) from None
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
