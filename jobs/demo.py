"""`make demo` / `python -m jobs.demo [--quick] [--out demo_out] ...`: the project end to end on this machine
(sample images -> shards -> local Ray head -> `ray job submit` MoCo pretraining -> kNN vs random init ->
segmentation overlays -> summary). The steps live in tools/demo.py."""

import argparse
import signal
import sys

from tools.demo import DEMO_CONFIG, QUICK, Demo, DemoError, DemoOptions, format_summary


def parse_args(argv: list[str] | None = None) -> DemoOptions:
    defaults = DemoOptions()
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a ~2-minute run for tests: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    parser.add_argument("--out", default=defaults.out, help="output folder (default demo_out)")
    parser.add_argument(
        "--train-per-class", type=int, help=f"train images per class ({defaults.train_per_class})"
    )
    parser.add_argument("--val-per-class", type=int, help=f"val images per class ({defaults.val_per_class})")
    parser.add_argument("--image-size", type=int, help=f"training/kNN view size ({defaults.image_size})")
    parser.add_argument("--epochs", type=int, help=f"pretraining epochs ({defaults.epochs})")
    parser.add_argument("--batch-size", type=int, help=f"per-worker batch ({defaults.batch_size})")
    parser.add_argument(
        "--photos", nargs="+", help=f"scikit-image photos to segment ({' '.join(defaults.photos)})"
    )
    parser.add_argument("--segment-size", type=int, help=f"overlay view size ({defaults.segment_size})")
    parser.add_argument("--config", default=DEMO_CONFIG, help=f"pretraining config ({DEMO_CONFIG})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra jobs.pretrain override, e.g. --set optim.base_lr=3e-3 (repeatable)",
    )
    parser.add_argument(
        "--fashion-mnist",
        default=defaults.fashion_mnist,
        help="Fashion-MNIST idx folder (Debian's dataset-fashion-mnist); if absent, crops of "
        "the scikit-image photos stand in",
    )
    args = parser.parse_args(argv)
    chosen = {
        **(QUICK if args.quick else {}),
        **{k: v for k, v in vars(args).items() if v is not None and k not in ("quick", "overrides")},
    }
    if args.photos:
        chosen["photos"] = tuple(args.photos)
    return DemoOptions(**chosen, overrides=tuple(args.overrides))


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the Ray head is stopped on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        demo = Demo(options)
    except ValueError as error:
        print(f"jobs.demo: {error}", file=sys.stderr)
        return 2
    try:
        summary = demo.run()
    except DemoError as error:
        print(f"\n[demo] FAILED at step '{demo.steps.current}': {error} (Ray is stopped)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n[demo] interrupted at step '{demo.steps.current}' (Ray is stopped)", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
