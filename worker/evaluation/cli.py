"""``cancelable-eval``: run the evaluation protocols and write the report.

    cancelable-eval run --data ../shared/data/lfw-dev --pairs ../shared/data/lfw-dev-pairs.tsv \\
        --identities 200 --keys 3 --out reports/eval            # one process: shard + report
    cancelable-eval run ... --shard 0/4 --out reports/eval     # worker 0 of 4 writes reports/eval/shards/0-of-4
    cancelable-eval merge reports/eval/shards/* --out reports/eval   # combine shard score files -> report
    cancelable-eval merge ... --out s3://bucket/prefix              # or write it to S3
    cancelable-eval acceptance reports/eval                         # the acceptance rows of a local report

Every shard draws its own random key material (never stored); keys only need to be consistent within an identity,
and every identity lives in exactly one shard.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.evaluation.evaluator import DETECTOR_FILE, RECOGNIZER_FILE, default_model_dir

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = REPO / "worker" / "bundles" / "keymap"


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError("--shard takes i/n, e.g. 0/4") from exc
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError("--shard i/n needs 0 <= i < n")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    shared = REPO.parent / "shared"
    ap = argparse.ArgumentParser(prog="cancelable-eval", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the protocols on (a shard of) an image set")
    run.add_argument("--data", default=str(shared / "data" / "lfw-dev"), help="folder of identity folders")
    run.add_argument("--pairs", default=None, help="pairs file (fold, mated, left, right) for the original ceiling")
    run.add_argument("--pairs-limit", type=int, default=None, help="use at most this many pairs-file rows")
    run.add_argument(
        "--threshold-pool", type=int, default=1000, help="photos of this many identities give original non-mated pairs"
    )
    run.add_argument(
        "--split",
        default="val",
        choices=("val", "train", "all", "holdout"),
        help="identity split (default val; holdout = sha256 %% 10 == 3, never trained on, real second photos)",
    )
    run.add_argument("--identities", type=int, default=50, help="number of identities (before sharding)")
    run.add_argument("--keys", type=int, default=3, help="key versions per identity (>= 3)")
    run.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the engine's, 50)")
    run.add_argument(
        "--key-target",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force the engine's consistency-over-time term on or off (default: as a worker deploys the bundle)",
    )
    run.add_argument("--attack-steps", type=int, default=50, help="inversion steps of the key-known attack")
    run.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="model bundle directory (default: keymap)")
    run.add_argument("--eval-models", default=None, help="evaluator models (default ../shared/models/eval)")
    run.add_argument("--shard", type=_shard, default=(0, 1), help="i/n: run only every n-th identity from i")
    run.add_argument(
        "--time-budget", type=float, default=None, help="seconds: stop starting new identities when exceeded"
    )
    run.add_argument("--chunk", type=int, default=8, help="identities per engine batch")
    run.add_argument("--threads", type=int, default=1, help="torch / onnxruntime CPU threads (1 is fastest on CPU)")
    run.add_argument("--device", default="cpu")
    run.add_argument("--out", default=str(REPO / "reports" / "eval"), help="output directory (or s3:// for report)")
    run.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples")
    merge = sub.add_parser("merge", help="combine shard score files into one report")
    merge.add_argument("shards", nargs="+", help="shard directories")
    merge.add_argument("--out", required=True, help="report directory or s3://bucket/prefix")
    merge.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples")
    acc = sub.add_parser("acceptance", help="print the acceptance rows of a report directory (with its shards/)")
    acc.add_argument("report", help="report directory: report.json and shards/*/records.npz")
    return ap


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from worker.algorithm.keymap_engine import build_engine
    from worker.bundle_config import deployed_config
    from worker.evaluation.evaluator import Evaluator
    from worker.evaluation.protocols import RunConfig, run_shard
    from worker.models.bundle import load_bundle, sha256_file

    torch.set_num_threads(args.threads)
    i, n = args.shard
    cfg = RunConfig(
        data_dir=args.data,
        pairs_file=args.pairs,
        split=args.split,
        identities=args.identities,
        keys=args.keys,
        steps=args.steps,
        attack_steps=args.attack_steps,
        shard_index=i,
        shard_count=n,
        chunk=args.chunk,
        pairs_limit=args.pairs_limit,
        threshold_pool=args.threshold_pool,
        time_budget_s=args.time_budget,
    )
    model_dir = Path(args.eval_models) if args.eval_models else default_model_dir()
    judge = Evaluator(model_dir, threads=args.threads)
    evaluator_info = {
        "recognizer": RECOGNIZER_FILE,
        "recognizer_sha256": sha256_file(judge.model_dir / RECOGNIZER_FILE),
        "detector": DETECTOR_FILE,
        "detector_sha256": sha256_file(judge.model_dir / DETECTOR_FILE),
        "alignment": "ArcFace 5-point 112x112, similarity transform; embedding(image) + embedding(flip)",
    }
    device = torch.device(args.device)
    bundle = load_bundle(args.bundle, device)
    engine = build_engine(
        bundle, deployed_config(Path(args.bundle), args.steps, args.key_target), device, Path(args.bundle)
    )
    local_out = Path(args.out) if not args.out.startswith("s3://") else REPO / "reports" / "eval-s3-staging"
    shard_dir = local_out / "shards" / f"{i}-of-{n}"
    run_shard(engine, judge, cfg, shard_dir, extra_meta={"evaluator": evaluator_info, "verify": _verify_meta(args)})
    if n == 1:
        return _merge([shard_dir], args.out, args.n_boot)
    print(f"shard done: {shard_dir}")
    print(f"when all {n} shards are done: cancelable-eval merge {local_out}/shards/* --out {args.out}")
    return 0


def _verify_meta(args: argparse.Namespace) -> dict:
    """The product's shipped decision rule for one- and two-photo templates (the bundle's calibrated thresholds under
    a default deployment), recorded with the shard so the report can state the product's own decision rates."""
    from worker.bundle_config import verify_policy
    from worker.models.bundle import read_manifest
    from worker.settings import EngineSettings

    policy = verify_policy(read_manifest(Path(args.bundle)), EngineSettings())
    rules = {str(n): policy.decide(n) for n in (1, 2)}
    return {
        "matcher": policy.matcher,
        "thresholds": {k: d.threshold for k, d in rules.items()},
        "far": {k: d.far for k, d in rules.items()},
    }


def _merge(shards: list[Path], out: str, n_boot: int) -> int:
    from worker.evaluation.protocols import compute_scores, load_shards
    from worker.evaluation.report import build_report, figures, write_report

    records, metas = load_shards(shards)
    keys = metas[0]["config"]["keys"]
    if any(
        x["config"]["keys"] != keys or x["config"]["shard_count"] != metas[0]["config"]["shard_count"] for x in metas
    ):
        print("shards were run with different --keys or shard counts", file=sys.stderr)
        return 2
    expected = metas[0]["config"]["shard_count"]
    if len(metas) != expected:
        print(f"warning: merging {len(metas)} of {expected} shards", file=sys.stderr)
    scores = compute_scores(records, keys)
    report = build_report(scores, metas, n_boot=n_boot)
    where = write_report(report, figures(report, scores, records), out)
    print(f"report written to {where}/report.md")
    _print_summary(report)
    return 0


def _print_summary(report: dict) -> None:
    p = report["protocols"]
    lines = []
    for name, block in (("original", p["original"]), ("enrol/probe same key", p["enrol_probe"]["same_key"])):
        if block:
            tars = ", ".join(
                f"TAR@{t['far_target']:g}={t['tar']:.3f}" if t["supported"] else f"TAR@{t['far_target']:g}=unsupported"
                for t in block["tar_at_far"]
            )
            lines.append(
                f"{name}: EER={block['eer']:.4f} AUC={block['auc']:.4f} {tars} (impostors {block['n_impostor']})"
            )
    psr = p["protection"]["psr_vs_original_photo"]["value"]
    lines.append(f"protection success rate: {psr if psr is None else round(psr, 4)}")
    if p["unlinkability"]:
        lines.append(f"D_sys: {p['unlinkability']['d_sys']:.4f}")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "acceptance":
        from worker.evaluation.acceptance import print_acceptance

        return print_acceptance(Path(args.report))
    return _merge([Path(s) for s in args.shards], args.out, args.n_boot)


if __name__ == "__main__":
    sys.exit(main())
