"""Evaluate a CAST checkpoint: kNN accuracy (weighted k=20 vote) on labelled shards, segment-retrieval mIoU
on image+mask shards, and the linear-probe result if one was written; JSON next to the checkpoint + a table.

    python -m jobs.evaluate --checkpoint runs/x/checkpoint_000009 --model cast_small \\
        --train-shards s3://b/imagenet/train --val-shards s3://b/imagenet/val
    python -m jobs.evaluate --random-init --model cast_tiny --size 64 --train-shards ... --val-shards ... \\
        --seg-bank-shards shards/mosaics-train --seg-shards shards/mosaics-val --level 2 --out random.json
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
import yaml

from cast.artifacts import report_url, write_report
from cast.eval.evaluate import EvaluationConfig, evaluate
from cast.eval.model_loading import load_model
from cast.eval.report import format_table
from cast.eval.shard_source import ShardBatches
from cast.superpixels import get_provider


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="our checkpoint, a state dict, or a released .pth/.pth.tar")
    weights.add_argument("--random-init", action="store_true", help="evaluate an untrained model (baseline)")
    parser.add_argument("--model", default="cast_small")
    parser.add_argument("--train-shards", help="labelled shards for the kNN memory")
    parser.add_argument("--val-shards", help="labelled shards scored by kNN")
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--knn-temperature", type=float, default=0.07)
    parser.add_argument("--seg-bank-shards", help="image+mask shards for the retrieval memory bank")
    parser.add_argument("--seg-shards", help="image+mask shards scored by segment retrieval")
    parser.add_argument("--level", type=int, help="hierarchy level of the retrieval segments (default: top)")
    parser.add_argument("--seg-k", type=int, default=20)
    parser.add_argument("--linear-probe",
                        help="linear-probe result JSON (default <checkpoint>.linear_probe.json)")
    parser.add_argument("--size", type=int, help="eval view size (default: the model's)")
    parser.add_argument("--superpixels", default="seeds",
                        help="superpixel provider name (default: seeds, the reference MoCo setting)")
    parser.add_argument("--superpixel-param", action="append", default=[], metavar="KEY=VALUE",
                        help="provider parameter, repeatable (e.g. num_superpixels=36): use the model's "
                             "training data.superpixel_params, or its tokens will not match")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-batches", type=int, help="stop each pass after this many batches (smoke runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="result JSON URL (default <checkpoint>.eval.json)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.random_init and not args.out:
        parser.error("--random-init needs --out (there is no checkpoint to write beside)")
    args.superpixel_params = {}
    for item in args.superpixel_param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--superpixel-param: expected KEY=VALUE, got {item!r}")
        args.superpixel_params[key] = yaml.safe_load(value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = EvaluationConfig(
        model=args.model, checkpoint=args.checkpoint, train_shards=args.train_shards,
        val_shards=args.val_shards, knn_k=args.knn_k, knn_temperature=args.knn_temperature,
        seg_bank_shards=args.seg_bank_shards, seg_shards=args.seg_shards, level=args.level,
        seg_k=args.seg_k, linear_probe=args.linear_probe, device=args.device, max_batches=args.max_batches,
    )
    try:
        config.validate()  # before any model or data is touched
        provider = get_provider(args.superpixels, **args.superpixel_params)
    except ValueError as error:
        print(f"jobs.evaluate: {error}", file=sys.stderr)
        return 2
    model = load_model(args.model, args.checkpoint, device=args.device)
    size = args.size or model.config.img_size
    source = ShardBatches(size, args.batch_size, args.workers, provider)
    results = evaluate(model, config, source.batches, source.class_names,
                       provider=provider if provider.on_device else None, progress=not args.no_progress)
    url = args.out or report_url(args.checkpoint)
    write_report(results, url)
    shown = {k: v for k, v in results.items() if k != "config"}
    print(format_table(shown, title=f"evaluation of {config.model}"))
    print(f"results: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
