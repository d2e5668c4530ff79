"""What the CLI prints: status lines that fit the job type, error messages naming the user's file, progress bars that
show their total from the first line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from producers.commands import _ProgressBar
from producers.render import result_summary, status_summary

ENROLL_RESULT = {
    "kind": "enroll",
    "job_id": "j1",
    "status": "succeeded",
    "tenant": "acme",
    "subject": "obama",
    "version": 1,
    "key_id": "k1",
    "key_version": 1,
    "manifest_uri": "s3://b/m.json",
    "image_uris": ["s3://b/1.png"],
    "attempts": 1,
}


def test_status_of_a_plain_enrol_has_no_fan_out_line():
    text = status_summary("j1", {"state": "succeeded", "attempts": 1, "result": ENROLL_RESULT})
    assert text.splitlines()[0] == "job j1: succeeded (attempts 1)"
    assert "?" not in text and "total" not in text


def test_status_of_a_bulk_before_its_total_is_known():
    p = {"kind": "bulk", "total": None, "succeeded": 2, "failed": 0, "pending": None, "failed_codes": {}}
    text = status_summary("b1", {"state": "running", "attempts": 1, "progress": p})
    assert "bulk: listing (total not known yet), succeeded 2, failed 0" in text and "?" not in text
    p = {**p, "total": 4, "pending": 2}
    text = status_summary("b1", {"state": "running", "attempts": 1, "progress": p})
    assert "bulk: total 4, succeeded 2, failed 0, pending 2" in text


def test_error_names_the_local_file_not_the_upload():
    res = {
        "kind": "verify",
        "job_id": "v1",
        "status": "failed",
        "tenant": "acme",
        "subject": "obama",
        "error": {"code": "no_face", "message": "s3://in/tenants/acme/uploads/abc.jpg: no face found"},
    }
    text = result_summary(res, {"s3://in/tenants/acme/uploads/abc.jpg": "photos/me.jpg"})
    assert text == "verify v1: failed (no_face: photos/me.jpg: no face found)"


@pytest.mark.parametrize("total_up_front", [None, 3])
def test_progress_bar_shows_its_total_from_the_first_line(capsys, total_up_front):
    bar = _ProgressBar("bulk abc", total_up_front)
    if total_up_front is None:
        bar.update(SimpleNamespace(total=None, done=0, failed=0))
        assert capsys.readouterr().err == ""  # nothing drawn while the total is unknown
    bar.update(SimpleNamespace(total=3, done=1, failed=0))
    bar.update(SimpleNamespace(total=3, done=3, failed=0))
    bar.close()
    err = capsys.readouterr().err
    frames = [f for f in err.replace("\r", "\n").splitlines() if f.strip()]
    assert frames and all("/3" in f for f in frames), frames
    assert "0item [" not in err and "3/3" in frames[-1]  # never the total-less "0item [00:00, ?item/s]"
