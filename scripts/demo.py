"""The main job end to end on a running stack (``infra/stack.sh up --worker``; ``make demo`` does both).

1. uploads a few face photos to the stack's input bucket;
2. makes sure the demo key exists in the local keyring;
3. enrols subject ``obama`` from one photo (most real enrolments have one; thresholds are calibrated per size);
4. verifies a genuine probe (a third photo of the same person) and an impostor (another person): scores, decisions;
5. revokes the subject's key version and shows the reissued version (and that the genuine probe still verifies);
6. prints where everything is in S3.

Photos: ``--enroll A [B ...] --genuine C --impostor D``, else ``../shared/data/faces-smoke/obama-biden``, else a
person with two photos in ``../shared/data/lfw-dev``. Exit status: 0 every job ran (a wrong accept/reject is printed
as a model-quality warning: the embedded bundles do not separate every pair of people, see their MODEL_CARD.md);
1 a job failed; 2 no photos / stack not up; 3 a decision was wrong and ``--strict-decisions`` was given.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CANCELABLE_SHARED_DIR", REPO.parent / "shared"))


def load_stack_env(path: Path = REPO / ".stack" / "env") -> None:
    """Use ``.stack/env`` (written by ``infra/stack.sh up``) when the settings are not in the environment yet."""
    if {"CANCELABLE_REDIS__URL", "CANCELABLE_REDIS__URL_FILE"} & set(os.environ) or not path.is_file():
        return
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export ") :]
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, v = line.split("=", 1)
        os.environ.setdefault(k.strip(), shlex.split(v)[0] if v.strip() else "")


def pick_photos(args: argparse.Namespace) -> tuple[list[Path], Path, Path, str]:
    if args.enroll:
        if not (args.genuine and args.impostor) or len(args.enroll) < 1:
            sys.exit("demo: give --enroll A [B ...] --genuine C --impostor D together")
        return [Path(p) for p in args.enroll], Path(args.genuine), Path(args.impostor), "your own photos"
    smoke = SHARED / "data" / "faces-smoke" / "obama-biden"
    if (smoke / "obama.jpg").is_file():
        return [smoke / "obama.jpg"], smoke / "obama3.jpg", smoke / "biden.jpg", str(smoke)
    lfw = SHARED / "data" / "lfw-dev"
    if lfw.is_dir():
        people = sorted(p for p in lfw.iterdir() if p.is_dir())
        two = next((p for p in people if len(list(p.glob("*.jpg"))) >= 2), None)
        other = next((p for p in people if p != two), None)
        if two is not None and other is not None:
            imgs = sorted(two.glob("*.jpg"))
            return imgs[:1], imgs[1], sorted(other.glob("*.jpg"))[0], f"{lfw} ({two.name} vs {other.name})"
    print(
        f"demo: no sample photos found ({SHARED}/data is absent). Bring your own: two photos of one person and one "
        "of another, e.g.\n  .venv/bin/python scripts/demo.py --enroll a1.jpg --genuine a2.jpg --impostor b.jpg",
        file=sys.stderr,
    )
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--enroll", nargs="+", help="photos of the subject to enrol")
    ap.add_argument("--genuine", help="another photo of the same person")
    ap.add_argument("--impostor", help="a photo of someone else")
    ap.add_argument("--tenant", default="demo")
    ap.add_argument("--subject", default="obama")
    ap.add_argument("--key", default=None, help="key ID in the local keyring (default: the stack's dev key)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for each job")
    ap.add_argument("--strict-decisions", action="store_true", help="exit 3 on a wrong accept/reject")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    load_stack_env()
    enroll_paths, genuine_path, impostor_path, source = pick_photos(args)

    from producers.client import Client
    from producers.render import result_summary
    from worker.contracts import JobStatus
    from worker.errors import MalformedJobError
    from worker.settings import SettingsError, get_settings

    try:
        settings = get_settings()
    except SettingsError as e:
        print(f"demo: {e}\n(is the stack up? `infra/stack.sh up --worker`, then `source .stack/env`)", file=sys.stderr)
        return 2
    key_id = args.key or os.environ.get("CANCELABLE_STACK_DEV_KEY") or "dev-key-1"

    client = Client(settings)
    try:
        client.ping(timeout=30)
        client.ping(timeout=300, engine=True)
    except Exception as e:
        print(
            f"demo: no worker answers on the queues ({type(e).__name__}); start the stack with "
            "`infra/stack.sh up --worker`",
            file=sys.stderr,
        )
        return 2

    # 1. key (local keyring only; a KMS deployment provisions keys with its security team)
    if settings.keys.provider == "local":
        from worker.keys.providers import write_keyring

        added = write_keyring(settings.keys.keyring_path, [key_id])
        print(f"key      {key_id} in {settings.keys.keyring_path}" + (" (created)" if added else " (exists)"))

    # 2. upload the photos: the CLI's own path (checked, content-named, into the tenant's input prefix)
    roles = [
        *((f"enroll{i}", p) for i, p in enumerate(enroll_paths, 1)),
        ("genuine", genuine_path),
        ("impostor", impostor_path),
    ]
    try:
        images = [client.local_image(args.tenant, p) for _, p in roles]
    except MalformedJobError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    refs = dict(zip((role for role, _ in roles), client.upload(images), strict=True))
    print(f"photos   {source} -> s3://{client.input_bucket}/tenants/{args.tenant}/uploads/")
    failed = False
    wrong = False

    def run_job(job, what: str):
        nonlocal failed
        t0 = time.monotonic()
        res = client.run(job, timeout=args.timeout)
        d = res if isinstance(res, dict) else res.model_dump(mode="json")
        print(f"\n== {what}: {d['status']} in {time.monotonic() - t0:.1f} s")
        if d["status"] != JobStatus.SUCCEEDED.value:
            failed = True
            err = d.get("error") or {}
            print(f"   error {err.get('code')}: {err.get('message')}")
        return d

    # 3. enrol
    enrol = run_job(
        client.enroll_job(args.tenant, args.subject, [refs[k] for k in refs if k.startswith("enroll")], key_id),
        f"enrol {args.tenant}/{args.subject} from {len(enroll_paths)} photo{'s' if len(enroll_paths) != 1 else ''}",
    )
    if enrol["status"] != "succeeded":
        return 1
    print(f"   version {enrol['version']} (key {enrol['key_id']} v{enrol['key_version']})")
    n_images = len(enrol["image_uris"])
    print(f"   committed {enrol['manifest_uri']}  (lists the template and {n_images} cancelable images)")

    # 4. genuine + impostor
    scores = {}
    for role, expect in (("genuine", "accept"), ("impostor", "reject")):
        v = run_job(client.verify_job(args.tenant, args.subject, refs[role]), f"verify {role} probe")
        if v["status"] == "succeeded":
            scores[role] = v
            ok = v["decision"] == expect
            wrong |= not ok
            print(f"   {result_summary(v)}\n   ({'as expected' if ok else 'WRONG, expected ' + expect})")

    # 5. revoke and reissue
    rev = run_job(
        client.revoke_job(args.tenant, "demo: key version compromised", subject=args.subject),
        f"revoke {args.tenant}/{args.subject}",
    )
    if rev["status"] == "succeeded":
        print(
            f"   revoked version(s) {rev['revoked_versions']} -> reissued version {rev['new_version']} "
            f"(key {rev['new_key_id']} v{rev['new_key_version']})"
        )
        print(f"   committed {rev['manifest_uri']}")
        for u in rev["revocation_uris"]:
            print(f"   revocation record {u}")
        for role, expect in (("genuine", "accept"), ("impostor", "reject")):
            after = run_job(
                client.verify_job(args.tenant, args.subject, refs[role]), f"verify {role} probe after reissue"
            )
            if after["status"] == "succeeded":
                scores[f"{role} v2"] = after
                ok = after["decision"] == expect
                wrong |= not ok
                print(f"   {result_summary(after)}\n   ({'as expected' if ok else 'WRONG, expected ' + expect})")

    print("\n== summary")
    print(
        f"   s3://{settings.s3.bucket}/tenants/{args.tenant}/subjects/{args.subject}/: current.json points at the "
        "committed version in versions/, whose manifest lists its template and images; revocations/, key.json"
    )
    for role, v in scores.items():
        print(f"   {role:11s} score {v['score']:.4f} vs threshold {v['threshold']:.4f} -> {v['decision'].upper()}")
    print(f"   state: .venv/bin/cancelable subject --tenant {args.tenant} --subject {args.subject}")
    print(f"   total {time.monotonic() - t_start:.1f} s")
    client.close()
    if failed:
        return 1
    if wrong:
        print(
            "demo: WARNING: a decision was wrong (see above). Every job ran; the embedded bundle is a small\n"
            "      64 px model that does not separate every pair of people (its MODEL_CARD.md).\n"
            "      Set CANCELABLE_ENGINE__BUNDLE to a production bundle.",
            file=sys.stderr,
        )
        if args.strict_decisions:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
