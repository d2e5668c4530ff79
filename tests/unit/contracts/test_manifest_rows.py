"""Bulk manifests row by row (pure parser, no services): line numbers, defects that fail alone, subjects grouped once,
naming rules in RE2, and the one confinement check for images and manifests."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from worker.contracts import BulkManifest, S3Prefix, S3Ref
from worker.contracts.inputs import InputPolicy
from worker.contracts.manifest import (
    MAX_MANIFEST_LINE,
    ManifestRow,
    ManifestRowError,
    csv_items,
    first_lines,
    jsonl_items,
    prefix_items,
    split_lines,
)
from worker.contracts.naming import MAX_RULE_CHARS, compile_rule
from worker.errors import ForbiddenInputError, MalformedJobError

REF = "s3://inb/tenants/acme/uploads/{}.jpg"


def _items(text: str, fmt: str = "csv", chunk: int = 7) -> list[ManifestRow | ManifestRowError]:
    data = text.encode("utf-8")
    lines = split_lines(data[i : i + chunk] for i in range(0, len(data), chunk))
    check = first_lines()
    items = csv_items(lines) if fmt == "csv" else jsonl_items(lines)
    return [check(item) for item, _ in items]


def _summary(items) -> tuple[list[tuple[int, str, int]], dict[int, str]]:
    rows = [(i.line, i.subject, len(i.images)) for i in items if isinstance(i, ManifestRow)]
    errors = {i.line: i.reason for i in items if isinstance(i, ManifestRowError)}
    return rows, errors


def test_csv_defects_fail_alone_at_their_lines_and_the_rows_after_them_are_read() -> None:
    text = (
        "subject,image\n"  # 1
        f"ann,{REF.format('a1')}\n"  # 2
        f'bob,"{REF.format("b1")}\n'  # 3: a quote left open
        f"ann,{REF.format('a2')}\n"  # 4: ann again, consecutive with 2 once line 3 is left out
        f"cy,{REF.format('c1')},extra\n"  # 5: 3 columns
        f"cy,s3://{'x' * 140_000}.jpg\n"  # 6: a field over csv.field_size_limit (and the line limit)
        f"cy,{REF.format('c2')}\n"  # 7
        f"cy,{REF.format('c2')}\n"  # 8: the same ref twice
        f"bad/one,{REF.format('d')}\n"  # 9
        f"ann,{REF.format('a3')}\n"  # 10: ann after other subjects
        f"ann,{REF.format('a4')}\n"  # 11
    )
    data = text.encode("utf-8") + b"dee,s3://inb/\xff.jpg\n"  # 12: not UTF-8
    lines = split_lines([data])
    check = first_lines()
    items = [check(i) for i, _ in csv_items(lines)]
    rows, errors = _summary(items)
    assert rows == [(2, "ann", 2), (7, "cy", 1)]
    assert sorted(errors) == [3, 5, 6, 8, 9, 10, 12]
    assert "quoted field is not closed" in errors[3] and "expected 2 columns, got 3" in errors[5]
    assert f"longer than {MAX_MANIFEST_LINE}" in errors[6] and "already listed" in errors[8] and "line 7" in errors[8]
    assert "listed again after other subjects (first at line 2)" in errors[10] and "UTF-8" in errors[12]
    by_line = {i.line: i for i in items if isinstance(i, ManifestRowError)}
    assert by_line[3].subject == "bob" and by_line[9].subject is None and by_line[10].subject == "ann"


def test_an_unterminated_quote_does_not_swallow_the_rows_after_it() -> None:
    rows = [f"s{i},{REF.format(i)}" for i in range(1, 11)]
    rows.insert(3, f's3x,"{REF.format("open")}')  # line 5
    rows, errors = _summary(_items("subject,image\n" + "\n".join(rows) + "\n"))
    assert len(rows) == 10 and list(errors) == [5]


def test_subject_over_64_images_and_mixed_keys() -> None:
    text = "subject,image,key_id\n" + "".join(f"big,{REF.format(i)},k1\n" for i in range(65))
    text += f"kay,{REF.format('k1')},k1\nkay,{REF.format('k2')},k2\nkay,{REF.format('k3')},\n"
    rows, errors = _summary(_items(text))
    assert rows == [(67, "kay", 1)]
    assert "65 images (lines 2-66)" in errors[2] and "differs" in errors[68] and "differs" in errors[69]


def test_jsonl_rows_and_repeated_subjects() -> None:
    lines = [
        json.dumps({"subject": "a", "images": [REF.format(1)]}),
        "{not json",
        json.dumps({"subject": "b", "images": [REF.format(2), REF.format(2)]}),
        "",
        json.dumps({"subject": "a", "images": [REF.format(3)]}),
        json.dumps({"subject": "c", "images": [REF.format(4)], "key_id": "k2"}),
    ]
    rows, errors = _summary(_items("\n".join(lines), "jsonl"))
    assert rows == [(1, "a", 1), (6, "c", 1)]
    assert sorted(errors) == [2, 3, 5] and "not JSON" in errors[2] and "twice" in errors[3]


def test_bad_csv_header_refuses_the_manifest() -> None:
    with pytest.raises(MalformedJobError, match="line 1"):
        _items("name,path\nann,s3://inb/x.jpg\n")


def test_resume_state_is_never_inside_a_pending_enrolment() -> None:
    """A continuation starting at an item's state reproduces exactly the items after it (CSV)."""
    text = "subject,image\n" + "".join(
        f"s{i // 3},{REF.format(i)}\n" if i % 5 else f's{i // 3},"open\n' for i in range(1, 40)
    )
    data = text.encode()
    whole = [(i, st) for i, st in csv_items(split_lines([data]))]
    header = text.split("\n", 1)[0] + "\n"
    for k, (_, st) in enumerate(whole):
        if st is None:
            continue
        rest = [i for i, _ in csv_items(split_lines([data[st[0] :]], st[0]), st[0], st[1], header)]
        assert [str(i) for i in rest] == [str(i) for i, _ in whole[k + 1 :]]


def test_naming_rules_are_re2_and_bounded() -> None:
    rx = compile_rule(r"^(?P<subject>([0-9a-f]+)+)x")  # catastrophic for a backtracking engine
    key = "0123456789abcdef" * 64  # 1,024 characters, never followed by x
    t = time.perf_counter()
    for _ in range(1000):
        assert rx.match(key) is None
    assert time.perf_counter() - t < 1.0  # 1,000 keys well under a second (a backtracking engine: forever)
    for bad in [r"(?P<subject>a)\1", r"(?=a)(?P<subject>a)", r"(?P<subject>[a-z]{1,100}){1,100}", "(?P<x>a)", "(a"]:
        with pytest.raises(ValueError):
            compile_rule(bad)
    with pytest.raises(ValueError, match=str(MAX_RULE_CHARS)):
        compile_rule("(?P<subject>a)" + "b" * MAX_RULE_CHARS)
    with pytest.raises(ValueError, match="RE2"):
        BulkManifest(format="prefix", uri="s3://inb/p/", naming_rule=r"(?P<subject>a)\1")
    rule = BulkManifest(format="prefix", uri="s3://inb/p/").rule()
    keys = ["p/alice/1.JPG", "p/alice/2.png", "p/bob/1.jpg", "p/readme.txt", "p/zed/x.gif"]
    rows = [i for i, _ in prefix_items("inb", "p/", keys, rule) if i is not None]
    assert [(r.line, r.subject, len(r.images)) for r in rows] == [(1, "alice", 2), (3, "bob", 1)]


def test_one_confinement_check_for_images_and_manifests() -> None:
    pol = InputPolicy("out", "inb", {"beta": ["s3://shared/beta/"]})
    for ok in ["s3://inb/tenants/acme/m.csv", "s3://inb/tenants/acme/uploads/"]:
        pol.check("acme", S3Ref.model_validate(ok) if not ok.endswith("/") else S3Prefix.model_validate(ok))
    refused = [
        S3Prefix.model_validate("s3://inb/tenants/beta/"),
        S3Prefix.model_validate("s3://inb/tenants/acm"),  # a prefix of acme's prefix lists acme2/... too
        S3Prefix.model_validate("s3://inb/tenants/"),
        S3Prefix.model_validate("s3://inb/"),
        S3Prefix.model_validate("s3://out/tenants/acme/"),  # the output bucket, even the tenant's own part
        S3Ref.model_validate("s3://out/tenants/acme/m.jsonl"),
        S3Ref.model_validate("s3://shared/beta/m.csv"),  # beta's allow-list is not acme's
    ]
    for where in refused:
        with pytest.raises(ForbiddenInputError):
            pol.check("acme", where)
    pol.check("beta", S3Prefix.model_validate("s3://shared/beta/x/"))


def test_local_manifest_check_reports_lines_without_a_traceback(tmp_path: Path) -> None:
    from producers.manifests import check_manifest

    m = tmp_path / "m.csv"
    body = f'subject,image\nann,{REF.format(1)}\nbob,s3://inb/{"y" * 200_000}.jpg\ncy,"{REF.format(2)}\n'
    body += f"dee,{REF.format(3)}\nann,{REF.format(4)}\n"
    m.write_text(body)
    found = check_manifest(m, "csv")
    assert (found.enrolments, found.bad_rows) == (2, 3)
    assert [e.line for e in found.errors] == [3, 4, 6]
    text = found.message(m)
    assert "line 3: line longer than" in text and "line 4: a quoted field" in text and "line 6: subject ann" in text


def test_prefix_resume_states_reproduce_what_follows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A listing resumed after any state's key, numbering from its index, yields exactly the rows after that state
    (rows, errors and heartbeats alike), including heartbeats inside an enrolment that is still being collected."""
    from worker.contracts import manifest as m

    monkeypatch.setattr(m, "HEARTBEAT_KEYS", 3)
    keys = []
    for k in range(5):
        keys += [f"p/g{k}/n{j}.txt" for j in range(4)] + [f"p/g{k}/z/s{k % 3}-{i}.jpg" for i in range(2)]
        keys.append(f"p/g{k}/z/bad..x-0.jpg")  # a subject the rule matches but that is not a valid ID
    rule = compile_rule(r"^g\d/z/(?P<subject>[^-]+)-\d\.jpg$")
    whole = list(prefix_items("inb", "p/", keys, rule))
    rows = [i for i, _ in whole if i is not None]
    assert [r.subject for r in rows if isinstance(r, ManifestRow)] == ["s0", "s1", "s2", "s0", "s1"]
    assert sum(1 for r in rows if isinstance(r, ManifestRowError)) == 5
    heartbeats = [st for i, st in whole if i is None]
    assert any(st[0] % 3 == 0 for st in heartbeats)  # at the key itself, between enrolments
    assert any(st[0] % 3 != 0 for st in heartbeats)  # before the first key of an enrolment being collected
    for k, (_, st) in enumerate(whole):
        if st is None:
            continue
        index, key = st
        after = keys[keys.index(key) + 1 :]
        again = [str(i) for i, _ in prefix_items("inb", "p/", after, rule, index) if i is not None]
        assert again == [str(i) for i, _ in whole[k + 1 :] if i is not None], (k, st)
