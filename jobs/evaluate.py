"""Evaluate a CAST checkpoint over Ray workers (or in this process): kNN on labelled shards, VOC segment
retrieval on image+mask shards, PartImageNet part/whole mIoU, semantic segmentation of a fine-tuned dense
model (jobs.finetune_seg) with sliding windows and overlays; one JSON per task beside the checkpoint
(``<checkpoint>.<task>.json``) and a printed table.

    python -m jobs.evaluate --task knn --checkpoint s3://b/runs/moco --model cast_small \\
        --train-shards s3://b/imagenet/train --val-shards s3://b/imagenet/val --workers 8 --gpu
    python -m jobs.evaluate --task retrieval --checkpoint checkpoint_0149.pth.tar --model cast_seg_small \\
        --seg-bank-shards s3://b/voc/train_aug --seg-shards s3://b/voc/val --workers 4 --gpu
    python -m jobs.evaluate --task partimagenet --checkpoint checkpoint_0099.pth.tar --model cast_base \\
        --part-shards s3://b/partimagenet/val --clip-weights /models/vit_b16_openai.bin --workers 4 --gpu
    python -m jobs.evaluate --task segmentation --checkpoint s3://b/runs/seg-ade/best \\
        --model cast_seg_small_deit --model-arg img_size=512 --seg-eval-shards s3://b/ade20k/val \\
        --size 512 --window 512 --stride 512 --superpixel-param num_superpixels=1024 --workers 8 --gpu
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from cast.artifacts import read_report, report_url, write_report
from cast.eval.distributed import RunSettings, run_tasks
from cast.eval.report import format_table
from cast.eval.tasks import KnnTask, LoaderSpec, ModelSpec, RetrievalTask, SegmentationTask

TASKS = ("knn", "retrieval", "partimagenet", "segmentation")


def _pairs(parser: argparse.ArgumentParser, items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"{flag}: expected KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", action="append", choices=TASKS,
                        help="repeatable; default: every task whose shards are given")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="our checkpoint or run, a state dict, a released .pth(.tar)")
    weights.add_argument("--random-init", action="store_true", help="an untrained model (the baseline)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random-init weights")
    parser.add_argument("--model", default="cast_small")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="model option, repeatable (img_size=512, num_clusters=[320,160,80,40], ...)")
    parser.add_argument("--size", type=int, help="view size (default: the model's img_size)")
    parser.add_argument("--superpixels", default="seeds",
                        help="provider (default: seeds, the reference); use the model's training setting")
    parser.add_argument("--superpixel-param", action="append", default=[], metavar="KEY=VALUE",
                        help="provider parameter, repeatable (e.g. num_superpixels=36): use the model's "
                             "training data.superpixel_params, or its tokens will not match")
    knn = parser.add_argument_group("knn")
    knn.add_argument("--train-shards", help="labelled shards for the kNN memory")
    knn.add_argument("--val-shards", help="labelled shards scored by kNN")
    knn.add_argument("--knn-k", type=int, default=20)
    knn.add_argument("--knn-temperature", type=float, default=0.07)
    retrieval = parser.add_argument_group("retrieval (reference section 5.5)")
    retrieval.add_argument("--seg-bank-shards", help="image+mask shards of the memory bank (VOC train_aug)")
    retrieval.add_argument("--seg-shards", help="image+mask shards scored (VOC val)")
    retrieval.add_argument("--level", type=int, help="hierarchy level of the segments (default: the top)")
    retrieval.add_argument("--seg-k", type=int, default=20)
    retrieval.add_argument("--embedding", default="projector", choices=("projector", "fused", "tokens"),
                           help="per-superpixel embedding: the MoCo projector (the reference), the fused "
                                "tokens, or the first-stage tokens")
    retrieval.add_argument("--long-side", type=int, default=512, help="resize the longer side (0: keep)")
    parts = parser.add_argument_group("partimagenet (reference section 5.7)")
    parts.add_argument("--part-shards", help="partimagenet-layout shards (val)")
    parts.add_argument("--clip-model", default="ViT-B-16-quickgelu")
    parts.add_argument("--clip-weights", help="OpenCLIP weights: a local file or URL (OpenAI ViT-B/16)")
    parts.add_argument("--clip-random", action="store_true", help="random CLIP weights (smoke runs only)")
    parts.add_argument("--coarse-level", type=int, default=4)
    parts.add_argument("--fine-level", type=int, default=3)
    parts.add_argument("--no-oracle", action="store_true", help="skip the ground-truth-segment oracle")
    dense = parser.add_argument_group("segmentation (reference sections 5.4, 5.6)")
    dense.add_argument("--seg-eval-shards", help="image+mask shards scored (ADE20K, Pascal Context, VOC val)")
    dense.add_argument("--decoder", default="mask_transformer", choices=("mask_transformer", "softmax"))
    dense.add_argument("--eval-resize", default="short", choices=("short", "long"),
                       help="side resized to --size: short (ADE20K, Pascal Context) or long (VOC)")
    dense.add_argument("--window", type=int, default=0, help="sliding window (0: whole image)")
    dense.add_argument("--stride", type=int, default=0, help="window stride (0: the window)")
    dense.add_argument("--overlays", help="folder for [image | ground truth | prediction] PNGs "
                       "(default <out>.segmentation-overlays)")
    dense.add_argument("--max-overlays", type=int, default=8)
    run = parser.add_argument_group("where it runs")
    run.add_argument("--workers", type=int, default=0, help="Ray workers (0: this process, no Ray)")
    run.add_argument("--gpu", action="store_true", help="one GPU per Ray worker")
    run.add_argument("--storage-path", default="outputs/eval-runs", help="Ray Train run folder (s3://...)")
    run.add_argument("--max-failures", type=int, default=2,
                     help="worker-group restarts (a preempted node); finished feature parts are reused")
    run.add_argument("--device", default="", help="device of an in-process run (default: cuda if present)")
    run.add_argument("--batch-size", type=int, default=64, help="kNN batch per worker")
    run.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes per worker")
    run.add_argument("--max-batches", type=int, help="stop each pass after this many batches (smoke runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", help="result prefix: <out>.<task>.json (default: the checkpoint)")
    parser.add_argument("--linear-probe", help="linear-probe result JSON to show (default "
                                                "<checkpoint>.linear_probe.json)")
    args = parser.parse_args(argv)
    if args.random_init and not args.out:
        parser.error("--random-init needs --out (there is no checkpoint to write beside)")
    args.superpixel_params = _pairs(parser, args.superpixel_param, "--superpixel-param")
    args.model_options = _pairs(parser, args.model_arg, "--model-arg")
    return args


def build_tasks(args: argparse.Namespace) -> list:
    """The tasks the arguments ask for; ValueError naming the missing option."""
    given = {"knn": (args.train_shards, args.val_shards),
             "retrieval": (args.seg_bank_shards, args.seg_shards), "partimagenet": (args.part_shards,),
             "segmentation": (args.seg_eval_shards,)}
    flags = {"knn": "--train-shards and --val-shards", "retrieval": "--seg-bank-shards and --seg-shards",
             "partimagenet": "--part-shards", "segmentation": "--seg-eval-shards"}
    for name, values in given.items():
        if any(values) and not all(values):
            raise ValueError(f"{name}: {flags[name]} go together; got only one of them")
    chosen = args.task or [name for name, values in given.items() if all(values)]
    if not chosen:
        raise ValueError("nothing to do; give --train-shards + --val-shards (kNN), --seg-bank-shards + "
                         "--seg-shards (retrieval) and/or --part-shards (PartImageNet)")
    for name in chosen:
        if not all(given[name]):
            raise ValueError(f"--task {name} needs {flags[name]}")
    base = args.out or args.checkpoint
    weights = None if args.random_init else args.checkpoint
    model = ModelSpec(args.model, weights, args.seed, args.model_options)
    size = args.size or args.model_options.get("img_size") or _default_size(args.model)
    common = {"superpixels": args.superpixels, "superpixel_params": args.superpixel_params,
              "workers": args.loader_workers, "max_batches": args.max_batches,
              "progress": not args.no_progress}
    tasks = []
    if "knn" in chosen:
        tasks.append(KnnTask(model, LoaderSpec("eval", size, args.batch_size, **common), args.train_shards,
                             args.val_shards, features=f"{base}.knn-features", k=args.knn_k,
                             temperature=args.knn_temperature))
    if "retrieval" in chosen:
        loader = LoaderSpec("segmentation_eval", size, 1, **common)  # images as stored, one at a time
        tasks.append(RetrievalTask(model, loader, args.seg_bank_shards, args.seg_shards,
                                   features=f"{base}.retrieval-features", level=args.level, k=args.seg_k,
                                   embedding=args.embedding, long_side=args.long_side))
    if "partimagenet" in chosen:
        from cast.eval.partimagenet import PartWholeTask

        if not args.clip_weights and not args.clip_random:
            raise ValueError("partimagenet: --clip-weights (a local file or URL of the OpenAI ViT-B/16 "
                             "weights) is needed; --clip-random runs random CLIP weights (smoke runs only)")
        loader = LoaderSpec("segmentation_eval", size, 1, **{**common, "superpixels": "",
                                                             "superpixel_params": {}})
        params = args.superpixel_params if args.superpixel_param else {"preset": "moco"}
        tasks.append(PartWholeTask(model, loader, args.part_shards, args.clip_model, args.clip_weights,
                                   size, args.coarse_level, args.fine_level, args.superpixels, params,
                                   oracle=not args.no_oracle))
    if "segmentation" in chosen:
        loader = LoaderSpec("segmentation_eval", size, 1, **common)  # images as stored, windows per image
        overlays = args.overlays if args.overlays is not None else f"{base}.segmentation-overlays"
        tasks.append(SegmentationTask(model, loader, args.seg_eval_shards, args.decoder, size=size,
                                      resize=args.eval_resize, window=args.window, stride=args.stride,
                                      overlays=overlays if args.max_overlays > 0 else "",
                                      max_overlays=args.max_overlays))
    return tasks


def _default_size(model: str) -> int:
    from cast.models import cast_config

    return cast_config(model).img_size


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = RunSettings(num_workers=args.workers, use_gpu=args.gpu, storage_path=args.storage_path,
                           max_failures=args.max_failures,
                           device=args.device)
    try:
        tasks = build_tasks(args)
        for task in tasks:  # before any model, data or cluster resource is touched
            task.validate(max(1, args.workers))
    except (ValueError, KeyError, FileNotFoundError) as error:
        print(f"jobs.evaluate: {error}", file=sys.stderr)
        return 2
    results = run_tasks(tasks, settings)
    base = args.out or args.checkpoint
    shown = {}
    for task, result in zip(tasks, results):
        url = write_report(result, report_url(base, task.name))
        shown[task.name] = {k: v for k, v in result.items() if k not in ("class_iou", "failed_images")}
        print(f"{task.name}: {url}")
    beside = report_url(args.checkpoint, "linear_probe") if args.checkpoint else None
    probe_url = args.linear_probe or beside
    probe = read_report(probe_url) if probe_url else None
    if probe is not None:
        shown["linear_probe"] = probe
    print(format_table(shown, title=f"evaluation of {args.model} ({base})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
