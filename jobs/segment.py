"""Hierarchical segmentation of images with a CAST checkpoint: per-level label maps and overlay PNGs.

    python -m jobs.segment --checkpoint runs/x/checkpoint.pth --images photo.jpg --out seg/
    python -m jobs.segment --random-init --model cast_tiny --size 96 --images photos/ --out seg/

``--images`` takes image files, folders, URLs (s3://, https://, ... through fsspec) or shards (a .tar,
a brace pattern of them, an ``_info.json``, or a folder holding one); repeat it or list several.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from cast.eval.images import iter_images
from cast.eval.model_loading import load_model
from cast.eval.segment_images import segment_images
from cast.superpixels import get_provider


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.segment", description=__doc__.split("\n\n")[0])
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="our checkpoint, a state dict, or a released .pth/.pth.tar")
    weights.add_argument("--random-init", action="store_true", help="untrained weights (demos, tests)")
    parser.add_argument("--images", nargs="+", required=True, help="files, folders, URLs or shards")
    parser.add_argument("--out", required=True, help="output folder or URL")
    parser.add_argument("--model", default="cast_small", help="registered CAST variant (default cast_small)")
    parser.add_argument("--levels", type=int, nargs="+", help="levels to write, 1-based (default: all)")
    parser.add_argument("--size", type=int, help="square view size, divisible by 8 (default: the model's)")
    parser.add_argument("--superpixels", type=int, default=196, help="SEEDS superpixels per view (196)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fill", choices=("mean", "palette"), default="mean",
                        help="overlay segments with their mean colour or a palette tint")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_model(args.model, None if args.random_init else args.checkpoint, device=args.device)
    size = args.size or model.config.img_size
    provider = get_provider("seeds", preset="moco", num_superpixels=args.superpixels)
    written = segment_images(
        model, iter_images(args.images), args.out, provider, size=size, levels=args.levels,
        batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
        overlay_options={"fill": args.fill},
    )
    print(f"segmented {len(written)} image(s) at {size}px into {args.out} "
          f"(overlays/, labels/, segments.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
