"""The ``cancelable`` parser: every option explains itself, exit codes and manifest formats are in ``--help``."""

from __future__ import annotations

import argparse

import pytest

from producers.cli import EXIT_CODES, build_parser
from producers.commands import EXIT_BY_NAME, CliError


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_option_and_argument_has_help_text():
    missing = []
    for name, sp in _subparsers(build_parser()).items():
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            if not (a.help or "").strip():
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, f"options without help text: {missing}"


def test_subcommands_are_the_documented_ones():
    expected = {
        "enroll",
        "verify",
        "revoke",
        "bulk",
        "upload",
        "status",
        "subject",
        "redrive",
        "index-keys",
        "fetch",
        "keys",
        "report",
        "erase",
    }
    assert set(_subparsers(build_parser())) == expected


@pytest.mark.parametrize(
    "command", ["enroll", "verify", "revoke", "bulk", "upload", "status", "subject", "redrive", "report", "erase"]
)
def test_help_lists_the_exit_codes(command):
    text = _subparsers(build_parser())[command].format_help()
    assert "exit status:" in text and "REJECTED" in text
    for code in EXIT_BY_NAME.values():
        assert f"\n  {code}  " in text


def test_exit_codes_are_distinct_and_reject_is_its_own():
    assert len(set(EXIT_BY_NAME.values())) == len(EXIT_BY_NAME)
    assert EXIT_BY_NAME["ok"] == 0 and EXIT_BY_NAME["reject"] not in (0, EXIT_BY_NAME["failed"])
    assert EXIT_CODES.count("\n") == len(EXIT_BY_NAME)


def test_bulk_help_documents_the_manifest_formats():
    text = _subparsers(build_parser())["bulk"].format_help()
    assert "subject,image[,key_id]" in text and '{"subject": "alice", "images": [' in text
    assert "(?P<subject>...)" in text and "cancelable upload" in text
    assert "RE2" in text and "tenants/TENANT/" in text and "never the output bucket" in text
    assert "report.jsonl" in text and "cancelable report JOB_ID --out FILE" in text


def test_report_takes_a_job_id_and_an_output_file():
    args = build_parser().parse_args(["report", "abcdefgh12", "--out", "r.csv", "--format", "csv"])
    assert (args.report_job_id, args.out, args.format) == ("abcdefgh12", "r.csv", "csv")
    args = build_parser().parse_args(["report", "--job", "abcdefgh12"])
    assert (args.report_job_id, args.job, args.format) == (None, "abcdefgh12", "jsonl")


def test_subject_takes_tenant_and_subject_as_options_or_positionally():
    from producers.cli import _aliases

    args = _aliases(build_parser().parse_args(["subject", "acme", "alice", "--json"]))
    assert (args.tenant, args.subject, args.json) == ("acme", "alice", True)
    args = _aliases(build_parser().parse_args(["subject", "--tenant", "acme", "--subject", "alice"]))
    assert (args.tenant, args.subject) == ("acme", "alice")
    with pytest.raises(CliError, match="disagree"):
        _aliases(build_parser().parse_args(["subject", "--tenant", "acme", "--subject", "alice", "acme", "bob"]))
    with pytest.raises(CliError, match="--tenant T --subject S"):
        _aliases(build_parser().parse_args(["subject", "--tenant", "acme"]))


def _usage(command: str) -> str:
    return " ".join(_subparsers(build_parser())[command].format_usage().split())


@pytest.mark.parametrize(
    ("command", "required", "optional"),
    [
        ("revoke", ["--tenant TENANT", "--reason REASON"], ["[--subject SUBJECT]", "[--key KEY_ID]"]),
        ("enroll", ["--tenant TENANT", "--subject SUBJECT", "--key KEY_ID"], ["[--job-id JOB_ID]"]),
        ("verify", ["--tenant TENANT", "--subject SUBJECT"], ["[--threshold THRESHOLD | --far FAR]"]),
        ("bulk", ["--tenant TENANT", "--key KEY_ID"], ["[--format {csv,jsonl,prefix}]"]),
        ("fetch", ["--tenant TENANT", "--subject SUBJECT"], ["[--version VERSION]"]),
        ("erase", ["--tenant TENANT", "--reason REASON"], ["[--subject SUBJECT]", "[--all-subjects]"]),
    ],
)
def test_help_marks_required_options_required(command, required, optional):
    """argparse writes a required option without brackets in the usage line; an optional one in brackets."""
    usage = _usage(command)
    for r in required:
        assert r in usage and f"[{r}]" not in usage, usage
    for o in optional:
        assert o in usage, usage


def test_revoke_without_reason_is_refused_by_the_parser_unless_a_job_file_carries_it():
    with pytest.raises(CliError, match="required: --reason"):
        build_parser().parse_args(["revoke", "--tenant", "t", "--subject", "s"])
    args = build_parser(job_file=True).parse_args(["revoke", "--job-file", "job.json"])
    assert args.reason is None and args.job_file == "job.json"


def test_keys_actions_parse():
    p = build_parser()
    assert p.parse_args(["keys", "add", "dev-key-2"]).key_ids == ["dev-key-2"]
    a = p.parse_args(["keys", "rotate", "--tenant", "acme", "--key", "dev-key-1", "--reason", "r"])
    assert (a.keys_command, a.key_id, a.new_key_id) == ("rotate", "dev-key-1", None)
    assert p.parse_args(["keys", "show", "k", "--tenant", "acme"]).tenant == "acme"
    with pytest.raises(CliError):
        p.parse_args(["keys", "rotate", "--tenant", "acme", "--key", "dev-key-1"])  # --reason is required


def test_photo_limits_are_stated_in_help():
    from worker.settings import WorkerSettings

    mp = WorkerSettings.model_fields["max_pixels"].default
    for command in ("enroll", "verify", "upload"):
        text = " ".join(_subparsers(build_parser())[command].format_help().split())
        assert f"{mp / 1e6:.0f} megapixels" in text and "CANCELABLE_WORKER__MAX_PIXELS" in text


def test_bundle_tool_lists_its_commands_with_help() -> None:
    from worker.bundletool.cli import build_parser

    text = build_parser().format_help()
    for command in ("calibrate-threshold", "fit-key-center", "rehash"):
        assert command in text
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["calibrate-threshold"])  # the bundle is required
    assert exc.value.code == 2


def test_index_keys_takes_a_tenant_and_an_optional_key() -> None:
    from producers.cli import _aliases

    args = _aliases(build_parser().parse_args(["index-keys", "acme"]))
    assert (args.command, args.tenant, args.key_id) == ("index-keys", "acme", None)
    assert _aliases(build_parser().parse_args(["index-keys", "acme", "k1"])).key_id == "k1"
    assert _aliases(build_parser().parse_args(["index-keys", "--tenant", "acme", "--key", "k1"])).key_id == "k1"
    with pytest.raises(CliError):
        _aliases(build_parser().parse_args(["index-keys"]))


def test_verify_takes_a_false_accept_rate_or_a_threshold_not_both():
    from producers.render import result_summary
    from worker.contracts import VerifyJob

    args = build_parser().parse_args(["verify", "--tenant", "acme", "--subject", "s", "--far", "1e-4", "p.jpg"])
    assert args.far == 1e-4 and args.threshold is None
    with pytest.raises(CliError, match="not allowed with"):
        build_parser().parse_args(["verify", "--tenant", "a", "--subject", "s", "--far", "1e-3", "--threshold", "0.9"])
    probe = "s3://bucket/tenants/acme/p.jpg"
    with pytest.raises(ValueError, match="not both"):
        VerifyJob(job_id="job-0001", tenant="acme", subject="s", probe=probe, threshold=0.9, far=1e-3)
    with pytest.raises(ValueError):
        VerifyJob(job_id="job-0001", tenant="acme", subject="s", probe=probe, far=1.5)
    # the rendered line states the FAR the threshold stands for (an upper bound when no impostor passed)
    base = {"kind": "verify", "job_id": "j1", "status": "succeeded", "tenant": "acme", "subject": "s", "version": 1}
    base |= {"key_id": "k", "key_version": 1, "score": 0.95, "threshold": 0.93, "decision": "accept"}
    line = result_summary({**base, "far": 0.0008, "far_ci95": [0.0002, 0.002], "enrolment_size": 1})
    assert "vs threshold 0.9300 (FAR 0.08 %, 1 photo) -> ACCEPT" in line
    line = result_summary({**base, "far": 0.0, "far_ci95": [0.0, 0.0011], "enrolment_size": 2})
    assert "(FAR < 0.11 %, 2 photos)" in line
    assert "(FAR not calibrated, 2 photos)" in result_summary({**base, "enrolment_size": 2})
