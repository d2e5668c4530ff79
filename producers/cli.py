"""``cancelable``: queue jobs and read their results from the command line (entry point ``producers.cli:main``).

    cancelable enroll  --tenant T --subject S --key K a.jpg b.jpg            (local photos or s3://bucket/key refs)
    cancelable verify  --tenant T --subject S probe.jpg
    cancelable revoke  --tenant T --subject S --reason "leaked"          (or --key K --new-key K2)
    cancelable erase   --tenant T --subject S --reason R                 (or --all-subjects --confirm T)
    cancelable bulk    --tenant T --key K manifest.csv|s3://b/m.jsonl|s3://b/prefix/ [--format prefix]
    cancelable upload  --tenant T a.jpg b.jpg                           (prints one s3:// reference per photo)
    cancelable status  TENANT/JOB_ID                                     (or JOB_ID --tenant T)
    cancelable report  TENANT/JOB_ID [--out FILE] [--format jsonl|csv]   (a bulk job's failed rows)
    cancelable subject --tenant T --subject S                        (or positionally: TENANT SUBJECT)
    cancelable fetch   --tenant T --subject S [--version N] DIR          (cancelable images + template record)
    cancelable keys    add|list|show|rotate                              (the keys templates are derived under)

Local photos are uploaded to the tenant's input prefix, ``s3://$CANCELABLE_S3__INPUT_BUCKET/tenants/T/uploads/``,
before the job is queued (each upload is printed, on stderr). Every job subcommand also takes ``--job-file FILE``,
``--job-id``, ``--no-wait`` (stdout: the job ID only) and ``--json``. Options a command needs are ``required`` in
its ``--help``; with ``--job-file`` the file carries them instead. Exit codes: ``EXIT_CODES`` (also in ``--help``).
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
    fetch_report,
    fetch_version,
    index_keys,
    redrive_jobs,
    run_job,
    show_status,
    show_subject,
    upload_files,
)
from producers.keys import add_keys, list_keys, rotate_key, show_key

EXIT_CODES = "exit status:\n" + "\n".join(
    f"  {EXIT_BY_NAME[name]}  {text}"
    for name, text in [
        ("ok", "done: the job succeeded (verify: ACCEPT); status/subject: found"),
        ("failed", "the job failed or was dead-lettered (the error code is printed)"),
        ("bad_input", "bad input or configuration: nothing was queued (revoke: also an unknown key ID)"),
        ("timeout", "timed out waiting (the job may still finish: cancelable status TENANT/JOB_ID)"),
        ("unavailable", "cannot reach Redis or S3"),
        ("reject", "verify ran and REJECTED the probe (score below the threshold)"),
        ("not_found", "status: unknown job ID; subject: nothing stored for that subject; report: no report"),
    ]
)

MANIFEST_FORMATS = """manifest formats:
  csv     header `subject,image[,key_id]`, one image per row, one row per line; consecutive rows of one
          subject form one enrolment (up to 64 images); key_id (optional) overrides --key for that row
          (every row of a subject names the same key). Example:
              subject,image
              alice,s3://cancelable-inputs/tenants/acme/uploads/4f1c0b....jpg
              alice,s3://cancelable-inputs/tenants/acme/uploads/9a02e7....jpg
              bob,s3://cancelable-inputs/tenants/acme/uploads/77e3d1....jpg
  jsonl   one JSON object per line: {"subject": "alice", "images": ["s3://...", ...], "key_id": "k"}
          (key_id optional)
  prefix  s3://bucket/prefix/: its objects grouped by subject with --naming-rule, an RE2 regex (no
          backreferences or lookaround; at most 512 characters) with a (?P<subject>...) group matched
          against each key below the prefix; default <subject>/<file>.jpg|png|webp
Where: a manifest (a CSV/JSONL object, or a prefix) must lie in the tenant's input prefix,
s3://INPUT_BUCKET/tenants/TENANT/ (or an entry of CANCELABLE_S3__INPUT_ALLOW); never the output bucket.
Images in a manifest are s3:// references: upload local photos first with `cancelable upload`. A local
manifest file is checked row by row first (any bad row: exit 2 listing the lines, nothing queued), then
uploaded to s3://INPUT_BUCKET/tenants/TENANT/manifests/JOB_ID.csv|jsonl; its format comes from its
extension (.csv, .jsonl) or --format.
Rows: each line is one row (a quote left open is an error at its line), at most 65,536 characters.
A bad row (bad CSV or JSON, bad subject ID or s3:// ref, a ref listed twice for a subject) fails alone;
the subject's other rows are still enrolled. A subject listed again after other subjects is not merged:
its later rows fail (`listed again after other subjects`) and its first enrolment stands. A subject with
more than 64 images fails as a whole.
Report: every failed row (line, subject, error code, message) is written under the job as
s3://BUCKET/tenants/TENANT/jobs/JOB_ID/report.jsonl and report.csv; `cancelable bulk` prints the first
few and the URI; `cancelable report JOB_ID --out FILE` downloads it."""


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


def _tenant(sp: argparse.ArgumentParser, required: bool = True) -> None:
    sp.add_argument(
        "--tenant", required=required, help="tenant ID (1-128 chars of [A-Za-z0-9._-]); separates storage and keys"
    )


def _subject(sp: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    sp.add_argument(
        "--subject", required=required, help=f"subject ID in the tenant (1-128 chars of [A-Za-z0-9._-]) {what}"
    )


def _max_pixels_text() -> str:
    from worker.settings import WorkerSettings

    f = WorkerSettings.model_fields
    return (
        f"photos: JPEG, PNG or WebP of at most {f['max_bytes'].default // 2**20} MiB; JPEG up to "
        f"{f['max_pixels'].default / 1e6:.0f} megapixels (decoded at a\n"
        f"reduced scale), PNG and WebP up to {f['max_pixels_full_decode'].default / 1e6:.0f} megapixels. Checked here, "
        "from the file's header, before\nanything is uploaded (the workers' CANCELABLE_WORKER__MAX_BYTES, "
        "CANCELABLE_WORKER__MAX_PIXELS,\nCANCELABLE_WORKER__MAX_PIXELS_FULL_DECODE)."
    )


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--job-file", help="the job as JSON (a file, or - for stdin) instead of the options")
    sp.add_argument("--job-id", help="job ID (8-128 chars of [A-Za-z0-9_-]); default: a random UUID")
    sp.add_argument(
        "--no-wait", action="store_true", help="queue and print only the job ID on stdout (uploads on stderr)"
    )
    sp.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the result (900)")
    sp.add_argument("--json", action="store_true", help="print the result as JSON (uploads go to stderr)")


def build_parser(job_file: bool = False) -> argparse.ArgumentParser:
    """The parser; ``job_file=True`` (the command line has ``--job-file``) drops the required options of job
    commands, which the file carries instead."""
    need = not job_file
    p = _Parser(
        prog="cancelable",
        description="Queue cancelable-biometrics jobs and read their results. Settings come from CANCELABLE_* "
        "variables (the local stack: `source .stack/env`).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    e = _sub(sub, "enroll", "enrol a subject from photos under a key (a new template version)", _max_pixels_text())
    _tenant(e, need)
    _subject(e, "to enrol", need)
    e.add_argument(
        "--key", dest="key_id", required=need, help="key ID the template is derived under (`cancelable keys list`)"
    )
    e.add_argument("images", nargs="*", help="local photo files (uploaded first) or s3://bucket/key references")
    _common(e)

    v = _sub(sub, "verify", "verify a probe photo against a subject's current template", _max_pixels_text())
    _tenant(v, need)
    _subject(v, "to verify against", need)
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
    _tenant(r, need)
    _subject(r, "to revoke (or give --key)", required=False)
    r.add_argument("--key", dest="key_id", help="revoke this whole key for the tenant (needs --new-key)")
    r.add_argument("--new-key", dest="new_key_id", help="key ID to reissue under (default: next version, same key)")
    r.add_argument("--reason", required=need, help="why (kept in the revocation record)")
    r.add_argument("--purge", action="store_true", help="delete the revoked version's cancelable images")
    _common(r)

    er = _sub(
        sub,
        "erase",
        "erase a subject (or every subject of a tenant): every version, image, template, key record and job record",
        "Leaves only an erasure record (when, by which job; the subject named by a SHA-256, not in clear).\n"
        "An enrolment racing the erasure is either erased with it or refused (error code erased).",
    )
    _tenant(er, need)
    _subject(er, "to erase (or give --all-subjects)", required=False)
    er.add_argument("--all-subjects", action="store_true", help="erase every subject of the tenant (needs --confirm)")
    er.add_argument("--confirm", metavar="TENANT", help="with --all-subjects: the tenant ID again")
    er.add_argument("--reason", required=need, help="why (kept in the erasure record; do not name the person)")
    _common(er)

    b = _sub(sub, "bulk", "enrol every subject listed in a manifest (CSV, JSONL or an S3 prefix)", MANIFEST_FORMATS)
    _tenant(b, need)
    b.add_argument("--key", dest="key_id", required=need, help="default key for rows that name none")
    b.add_argument("--format", choices=["csv", "jsonl", "prefix"], help="manifest format (default: from its name)")
    b.add_argument(
        "--naming-rule", help="prefix manifests: RE2 regex with a (?P<subject>...) group (checked before queueing)"
    )
    b.add_argument("--chunk-size", type=int, help="enrolments queued per step (default: the worker's)")
    b.add_argument("manifest", nargs="?", help="local file, s3://bucket/key.csv|.jsonl or s3://bucket/prefix/")
    _common(b)

    u = _sub(
        sub,
        "upload",
        "upload local photos to the tenant's input prefix; print one s3:// reference each",
        _max_pixels_text(),
    )
    _tenant(u)
    u.add_argument("files", nargs="+", help="local JPEG, PNG or WebP photos")

    rp = _sub(
        sub,
        "report",
        "download a finished bulk job's report: every failed row with its line, subject, error code, message",
    )
    rp.add_argument(
        "report_job_id", nargs="?", metavar="TENANT/JOB_ID", help="the bulk job as printed when it was queued"
    )
    rp.add_argument("--job", help="the bulk job (instead of the positional TENANT/JOB_ID)")
    rp.add_argument("--tenant", help="the job's tenant, when a job ID alone is given")
    rp.add_argument("--out", help="write the report to this file (default: stdout)")
    rp.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="report format (jsonl)")

    s = _sub(sub, "status", "state of a job (bulk and revoke: progress by state)")
    s.add_argument(
        "job_id",
        metavar="TENANT/JOB_ID",
        help="the job as printed when it was queued (job IDs are unique per tenant), or its job ID with --tenant",
    )
    s.add_argument("--tenant", help="the job's tenant, when JOB_ID alone is given")
    s.add_argument("--json", action="store_true", help="print the status as JSON")

    rd = _sub(sub, "redrive", "queue dead-lettered jobs again under their own job IDs")
    rd.add_argument("job_ids", nargs="*", metavar="TENANT/JOB_ID", help="dead-lettered jobs to queue again")
    rd.add_argument("--all-dead", action="store_true", help="every dead-lettered job recorded in Redis")

    ix = _sub(
        sub,
        "index-keys",
        "operators: build a tenant's key subject index from S3 and mark it complete (once per tenant, after upgrade)",
    )
    _tenant(ix, required=False)
    ix.add_argument("--key", dest="key_opt", help="one key only (default: every key of the tenant, present and future)")
    ix.add_argument("index_tenant", metavar="tenant", nargs="?", help="same as --tenant (older form)")
    ix.add_argument("key_id", nargs="?", help="same as --key (older form)")

    st = _sub(sub, "subject", "what is stored for a subject: current version, key version, revoked versions")
    _tenant(st, required=False)
    _subject(st, "to show", required=False)
    st.add_argument("subject_tenant", metavar="tenant", nargs="?", help="same as --tenant (older form)")
    st.add_argument("subject_id", metavar="subject", nargs="?", help="same as --subject (older form)")
    st.add_argument("--json", action="store_true", help="print the state as JSON")

    f = _sub(
        sub,
        "fetch",
        "write a template version's cancelable images and its template record into a directory",
        "Files: image-NN.<ext> (the cancelable images, in enrolment order), template.json (the template record:\n"
        "key ID and version, embedding model, the template vector) and manifest.json (the version manifest).",
    )
    _tenant(f)
    _subject(f, "to fetch")
    f.add_argument("--version", type=int, help="template version (default: the current one)")
    f.add_argument("--force", action="store_true", help="overwrite files already in DIR")
    f.add_argument("dir", metavar="DIR", help="directory to write (created if missing)")
    f.add_argument("--json", action="store_true", help="print what was written as JSON")

    k = _sub(sub, "keys", "the keys templates are derived under: add, list, show, rotate")
    ks = k.add_subparsers(
        dest="keys_command", required=True, parser_class=_Parser, metavar="ACTION", help="what to do with keys"
    )
    ka = _sub(ks, "add", "add keys with fresh random material to the local keyring (mode 0600; never printed)")
    ka.add_argument("key_ids", nargs="+", metavar="KEY_ID", help="key IDs to add (existing ones are left unchanged)")
    kl = _sub(ks, "list", "list the keys (local keyring, or the KMS key map) without their material")
    _tenant(kl, required=False)
    kl.add_argument("--json", action="store_true", help="print the keys as JSON")
    ksh = _sub(ks, "show", "one key: provider, creation time or KMS key, and its state for a tenant")
    ksh.add_argument("key_id", metavar="KEY_ID", help="the key ID")
    _tenant(ksh, required=False)
    ksh.add_argument("--json", action="store_true", help="print the key as JSON")
    kr = _sub(
        ks,
        "rotate",
        "revoke a key for a tenant and reissue every subject under a new key (added to the keyring if missing)",
    )
    _tenant(kr)
    kr.add_argument("--key", dest="key_id", required=True, help="the key to retire for the tenant")
    kr.add_argument("--new-key", dest="new_key_id", help="the key to move to (default: the next number, dev-key-2)")
    kr.add_argument("--reason", required=True, help="why (kept in the revocation record)")
    kr.add_argument("--purge", action="store_true", help="delete the revoked versions' cancelable images")
    _common(kr)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else argv
        job_file = any(a == "--job-file" or a.startswith("--job-file=") for a in argv)
        args = _aliases(build_parser(job_file).parse_args(argv))
        return _dispatch(args)
    except CliError as e:
        print(f"cancelable: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cancelable: interrupted (queued jobs keep running; see `cancelable status`)", file=sys.stderr)
        return 130


def _aliases(args: argparse.Namespace) -> argparse.Namespace:
    """The older positional forms of ``subject`` and ``index-keys`` -> ``--tenant``/``--subject``/``--key``."""

    def one(flag: str, opt: str | None, pos: str | None) -> str | None:
        if opt is not None and pos is not None and opt != pos:
            raise CliError(f"cancelable {args.command}: {flag} {opt} and the positional {pos} disagree")
        return opt if opt is not None else pos

    if args.command == "subject":
        args.tenant = one("--tenant", args.tenant, args.subject_tenant)
        args.subject = one("--subject", args.subject, args.subject_id)
        if args.tenant is None or args.subject is None:
            raise CliError("cancelable subject: give --tenant T --subject S")
    elif args.command == "index-keys":
        args.tenant = one("--tenant", args.tenant, args.index_tenant)
        args.key_id = one("--key", args.key_opt, args.key_id)
        if args.tenant is None:
            raise CliError("cancelable index-keys: give --tenant T")
    return args


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
            "fetch": fetch_version,
            "upload": upload_files,
            "redrive": redrive_jobs,
            "index-keys": index_keys,
            "keys": {"add": add_keys, "list": list_keys, "show": show_key, "rotate": rotate_key}.get(
                getattr(args, "keys_command", ""), run_job
            ),
            "report": fetch_report,
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
