"""``cancelable-bundle <command>``: operator commands over a model bundle directory.

calibrate-threshold BUNDLE  run the engine as a worker deploys it on LFW identities and pick the verify
                            threshold at a target FAR (``--write`` stores it in the manifest)
fit-key-center BUNDLE       lite-family bundles: dlib's mean embedding direction -> ``engine.key_target_center``
rehash BUNDLE               recompute every component's SHA-256 in the manifest (after replacing a weight file)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _rehash(args: argparse.Namespace) -> int:
    from worker.models.bundle import write_manifest

    path = write_manifest(args.bundle)
    print(f"{path}: component hashes recomputed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from worker.bundletool import calibrate, key_center

    ap = argparse.ArgumentParser(
        prog="cancelable-bundle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "calibrate-threshold",
        help="pick the verify threshold at a target FAR",
        description=calibrate.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    calibrate.add_arguments(p)
    p.set_defaults(func=calibrate.main)
    p = sub.add_parser(
        "fit-key-center",
        help="write engine.key_target_center (lite family)",
        description=key_center.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    key_center.add_arguments(p)
    p.set_defaults(func=key_center.main)
    p = sub.add_parser("rehash", help="recompute the manifest's component hashes")
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.set_defaults(func=_rehash)
    return ap


def main(argv: list[str] | None = None) -> int:
    from worker.errors import CancelableError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CancelableError as exc:
        print(f"cancelable-bundle: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
