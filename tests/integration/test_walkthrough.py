"""The README's newcomer walk-through, replayed: the ```console block between ``<!-- walkthrough:start -->`` and
``<!-- walkthrough:end -->`` is run command by command in one bash session, against a real stack started by
``infra/stack.sh up --worker`` (its own ports and state directory), and every output line the README shows must
appear in that command's output, in order (``…`` matches anything within a line; a line ``…`` alone skips lines).

The only rewrites: ``.stack/`` (in commands) -> the test's state directory, ``photos/`` -> a folder holding the
sample faces (../shared/data/faces-smoke/obama-biden), the default S3 port 8333 (in output) -> the test stack's.
The stack's dev key gets the fixed public test material of the lite tests (tests/integration/
test_worker_enroll_verify.py ``_fixed_keyring``, key k1): the README shows scores to two decimals, and a fresh random
key moves them (and, near the threshold, could flip a decision), so they would not be reproducible.

Scores also move with the CPU: 50 optimisation steps carry last-bit float differences between kernels (AMD EPYC vs
Intel Xeon) into the third decimal, e.g. 0.95xx vs 0.9618 and 0.90xx vs 0.8971 for the same photos and key. So a
README score ``score 0.95…`` (two decimals shown) matches any score within ``SCORE_TOLERANCE`` of [0.95, 0.96); the
decision, the threshold and everything else on the line must match exactly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_stack import REPO, Stack, make_stack  # noqa: F401 - make_stack is a fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]

README = REPO / "README.md"
SHARED = Path(os.environ.get("CANCELABLE_SHARED_DIR", REPO.parent / "shared"))
FACES = SHARED / "data" / "faces-smoke" / "obama-biden"
MARK = "@@walkthrough-command-done@@"


def transcript(text: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for each ``$ `` line of the walk-through block."""
    block = text.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    body = block.split("```console\n", 1)[1].split("```", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    return steps


SCORE_TOLERANCE = 0.02
_SCORE = re.compile(r"score (\d\.\d+)…")


def _pattern(line: str) -> re.Pattern[str]:
    parts = _SCORE.split(line)  # text, score shown, text, ...
    regex = ""
    for k, part in enumerate(parts):
        if k % 2:
            regex += r"score (\d\.\d+)"
        else:
            regex += ".*?".join(re.escape(p) for p in part.split("…"))
    return re.compile(regex + r"\s*")


def _line_matches(want: str, got: str) -> bool:
    m = _pattern(want).fullmatch(got)
    if m is None:
        return False
    for shown, value in zip(_SCORE.findall(want), m.groups(), strict=True):
        low, high = float(shown), float(shown) + 10.0 ** -len(shown.split(".")[1])
        if not low - SCORE_TOLERANCE <= float(value) < high + SCORE_TOLERANCE:
            return False
    return True


def missing_lines(expected: list[str], output: str) -> list[str]:
    """Expected lines not found in ``output`` in order (``…`` wildcards; a bare ``…`` line is skipped; a shown score
    matches within ``SCORE_TOLERANCE``)."""
    lines = output.splitlines()
    i, missing = 0, []
    for want in expected:
        if want.strip() in ("…", ""):
            continue
        j = next((k for k in range(i, len(lines)) if _line_matches(want, lines[k])), None)
        if j is None:
            missing.append(want)
        else:
            i = j + 1
    return missing


def test_transcript_parser_finds_the_walkthrough() -> None:
    steps = transcript(README.read_text())
    commands = [c for c, _ in steps]
    assert any(c.startswith("infra/stack.sh up") for c in commands)
    assert sum("cancelable verify" in c for c in commands) >= 3 and any("cancelable revoke" in c for c in commands)
    assert any("cancelable subject" in c for c in commands)
    # the matcher itself: order matters, wildcards stay within a line
    assert missing_lines(["a …", "c"], "a b\nc\n") == []
    assert missing_lines(["c", "a …"], "a b\nc\n") == ["a …"]
    assert missing_lines(["exit 5"], "exit 0\n") == ["exit 5"]
    # a shown score matches within the tolerance; the decision must match exactly
    want = ["verify …: succeeded; score 0.95… vs threshold 0.9290 -> ACCEPT (v1)"]
    for got, ok in (
        ("0.9618", True),
        ("0.9301", True),
        ("0.9550", True),
        ("0.9801", False),
        ("0.9250", False),
    ):
        line = f"verify ab12: succeeded; score {got} vs threshold 0.9290 -> ACCEPT (v1)\n"
        assert (missing_lines(want, line) == []) is ok, got
    assert missing_lines(want, "verify ab12: succeeded; score 0.9551 vs threshold 0.9290 -> REJECT (v1)\n") == want


def _fixed_dev_key(stack: Stack, key_id: str) -> None:
    material = hashlib.sha256(b"lite-test-key:k1").digest()  # the lite tests' fixed public key k1
    keys = {key_id: {"b64": base64.b64encode(material).decode()}}
    stack.dir.mkdir(parents=True, exist_ok=True)
    path = stack.dir / "keyring.json"
    path.write_text(json.dumps({"format": "cancelable-keyring/1", "keys": keys}))
    path.chmod(0o600)


def test_readme_walkthrough_replays(make_stack, tmp_path: Path) -> None:  # noqa: F811 - fixture
    if not FACES.is_dir():
        pytest.skip(f"sample faces not found at {FACES} (set CANCELABLE_SHARED_DIR); the walk-through enrols them")
    photos = tmp_path / "photos"
    shutil.copytree(FACES, photos)
    # the README leads a user to create photos/ in the repository (ignored by git); the replay must not touch it
    repo_photos_before = sorted(p.name for p in (REPO / "photos").iterdir()) if (REPO / "photos").is_dir() else None
    stack = make_stack()
    _fixed_dev_key(stack, "dev-key-1")
    env = {
        **stack.env,
        "STACK_WORKER_WAIT_S": "300",
        "CANCELABLE_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }

    def paths(s: str) -> str:
        return s.replace("photos/", f"{photos}/")

    steps = [
        (paths(c).replace(".stack/", f"{stack.dir}/"), [paths(x).replace(":8333", f":{stack.s3_port}") for x in out])
        for c, out in transcript(README.read_text())
    ]
    script = "exec 2>&1\n" + "\n".join(f"{c}\necho {MARK}" for c, _ in steps)  # as a terminal shows it
    r = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    if os.environ.get("CANCELABLE_WALKTHROUGH_OUT"):  # to refresh the README: the whole session as it ran
        Path(os.environ["CANCELABLE_WALKTHROUGH_OUT"]).write_text(r.stdout.replace(MARK + "\n", ""))
    outputs = r.stdout.split(MARK)
    assert len(outputs) >= len(steps), f"the walk-through stopped early:\n{r.stdout}\n{r.stderr}"
    failures = []
    for (cmd, expected), out in zip(steps, outputs, strict=False):
        miss = missing_lines(expected, out)
        if miss:
            failures.append(f"$ {cmd}\n  missing: {miss}\n  got:\n{out}")
    assert not failures, "\n\n".join(failures) + f"\n\nstderr:\n{r.stderr}\nlogs:\n{stack.log_tails()}"
    # nothing of the walk-through leaks into the repository
    repo_photos_after = sorted(p.name for p in (REPO / "photos").iterdir()) if (REPO / "photos").is_dir() else None
    assert repo_photos_after == repo_photos_before


def test_demo_prints_committed_paths_and_the_clis_threshold(make_stack, tmp_path: Path) -> None:  # noqa: F811
    """``make demo``'s script on a real stack: every job runs (exit 0), what it prints as stored is committed
    (versions/..., never a staging/ path), and its verify lines are the CLI's own (the default bundle's one-photo
    threshold and the false-accept rate it stands for): genuine and impostor, before and after the reissue."""
    if not FACES.is_dir():
        pytest.skip(f"sample faces not found at {FACES} (set CANCELABLE_SHARED_DIR)")
    stack = make_stack()
    _fixed_dev_key(stack, "dev-key-1")
    env = {
        **stack.env,
        "STACK_WORKER_WAIT_S": "300",
        "CANCELABLE_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "CANCELABLE_SHARED_DIR": str(SHARED),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    script = f'infra/stack.sh up --worker >/dev/null && set -a && . "{stack.dir}/env" && set +a && '
    script += ".venv/bin/python scripts/demo.py; rc=$?; infra/stack.sh down >/dev/null; exit $rc"
    r = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout, r.stderr, stack.log_tails())
    assert "staging/" not in r.stdout, r.stdout
    assert "committed s3://cancelable/tenants/demo/subjects/obama/versions/0000000001.json" in r.stdout
    assert "committed s3://cancelable/tenants/demo/subjects/obama/versions/0000000002.json" in r.stdout
    verify_lines = [line for line in r.stdout.splitlines() if "verify " in line and "vs threshold" in line]
    shipped = "vs threshold 0.5655 (FAR 0.095 %, 1 photo) -> "
    assert len(verify_lines) == 4 and all(shipped in line for line in verify_lines), r.stdout
    assert "uploads/" in r.stdout and "s3://cancelable-inputs/tenants/demo/" in r.stdout
