"""Does the classification default ``seeds_fast`` cost accuracy against full-resolution SEEDS?

    python -m benchmarks.superpixel_knn --seeds 0 1          # ~15-20 min per seed on 2 shared cores
    python -m benchmarks.superpixel_knn --steps 24 --train-per-class 40 --val-per-class 20   # 3 min smoke

Two MoCo pretraining runs of ``cast_tiny`` (jobs/configs/moco_cast_tiny.yaml, through ``cast.train``'s
driver on an in-process Ray cluster) on the same Fashion-MNIST images, with the same seed, batch and
step count; they differ only in ``data.superpixels``: ``seeds`` (the reference MoCo preset: 15 bins,
20 iterations, full resolution) or ``seeds_fast`` (half resolution, 5 bins, 5 iterations), both asked
for the same number of superpixels. Each trained encoder and the common random initialisation are then
scored by weighted kNN (k=20, ``cast.eval``) on held-out Fashion-MNIST test images, once with each
provider (a model's own provider is the fair score; the other shows how much the grouping at test time
matters). Also reported: wall time of each run, the loader's MoCo samples/s per core with each provider
(and with none: the floor), and the superpixel counts each provider gives. Table on stdout, JSON under
``--out``. Data and runs stay under ``--out`` (outputs/ is git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import torch
from ray.train import UserCallback

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "moco_cast_tiny.yaml"
MODEL = "cast_tiny"
PROVIDERS = ("seeds", "seeds_fast")


def provider_params(name: str, num_superpixels: int) -> dict:
    """``seeds`` keeps its MoCo preset's bins and iterations (they do not depend on the image size)."""
    return (
        {"preset": "moco", "num_superpixels": num_superpixels}
        if name == "seeds"
        else {"num_superpixels": num_superpixels}
    )


def prepare_data(root: Path, size: int, split: str, per_class: int) -> str:
    """Fashion-MNIST ``split`` (``per_class`` images of each class at ``size`` px) as shards; reused."""
    from data_tools.make_shards import build_shards
    from data_tools.sample_data import fashion_mnist

    name = f"fashion-mnist-{split}-{per_class}pc-{size}px"
    shards = root / "data" / name
    if not (shards / "_info.json").exists():
        images = root / "data" / f"{name}-images"
        fashion_mnist(images, split=split, per_class=per_class, size=size)
        # >= 16 shards, so 2 ranks x a few loader workers all get some
        build_shards(
            str(images), str(shards), "imagefolder", max_count=math.ceil(10 * per_class / 16), progress=False
        )
        shutil.rmtree(images)
    return str(shards)


def loader_throughput(shards: str, size: int, num_superpixels: int, batches: int, rounds: int):
    """MoCo two-view samples per second through ``cast.data``'s loader (no DataLoader workers), with each
    provider and without superpixels (the floor), interleaved round by round; also returns the floor's
    views as uint8 for ``provider_cost``."""
    from cast.data import DataConfig, build_loader
    from cast.data.transforms import to_unit
    from cast.superpixels import get_provider
    from cast.superpixels.base import images_to_uint8_hwc

    variants = {**{name: name for name in PROVIDERS}, "none (floor)": ""}
    cpu_rates: dict[str, list[float]] = {v: [] for v in variants}
    wall_rates: dict[str, list[float]] = {v: [] for v in variants}
    views = []
    for round_index in range(rounds):
        for variant, name in variants.items():
            config = DataConfig(
                shards=shards,
                recipe="moco",
                image_size=size,
                batch_size=32,
                num_workers=0,
                shuffle_buffer=64,
                seed=0,
                superpixels=name,
            )
            provider = get_provider(name, **provider_params(name, num_superpixels)) if name else None
            loader = build_loader(config, rank=0, world_size=1, epoch=round_index, provider=provider)
            samples = 0
            cpu, wall = time.process_time(), time.perf_counter()
            for index, batch in enumerate(loader):
                if index >= batches:
                    break
                samples += batch["images"].shape[0]
                if not name and round_index == 0:
                    views.extend(images_to_uint8_hwc(to_unit(batch["images"].flatten(0, 1))))
            cpu_rates[variant].append(samples / (time.process_time() - cpu))
            wall_rates[variant].append(samples / (time.perf_counter() - wall))
    rates = {
        variant: {
            "samples_per_s_cpu": statistics.median(cpu_rates[variant]),
            "samples_per_s_wall": statistics.median(wall_rates[variant]),
        }
        for variant in variants
    }
    return rates, views


def provider_cost(views: list, num_superpixels: int, rounds: int) -> dict:
    """Process-CPU ms per view of each provider called on the same MoCo views (interleaved rounds, one
    SEEDS object reused as in a loader), and the superpixels it gives per view: in the map and on the
    model's token grid (the top-left pixel of each 8x8 cell)."""
    from cast.superpixels import get_provider

    providers = {name: get_provider(name, **provider_params(name, num_superpixels)) for name in PROVIDERS}
    times: dict[str, list[float]] = {name: [] for name in PROVIDERS}
    maps: dict[str, list] = {}
    for _ in range(rounds):
        for name, provider in providers.items():
            provider(views[0])  # builds the SEEDS object outside the timing
            started = time.process_time()
            maps[name] = [provider(view) for view in views]
            times[name].append((time.process_time() - started) * 1000 / len(views))
    out = {}
    for name in PROVIDERS:
        in_map = sorted(int(m.max()) + 1 for m in maps[name])
        on_grid = sorted(len(set(m[::8, ::8].ravel().tolist())) for m in maps[name])
        out[name] = {
            "params": provider_params(name, num_superpixels),
            "ms_per_view": statistics.median(times[name]),
            "views": len(views),
            "labels_map_median": statistics.median(in_map),
            "labels_map_min": in_map[0],
            "labels_grid_median": statistics.median(on_grid),
            "labels_grid_min": on_grid[0],
        }
    return out


def train_config(args: argparse.Namespace, shards: str, provider: str, seed: int, storage: Path):
    """moco_cast_tiny.yaml with this benchmark's size, steps and seed; only the provider differs."""
    from cast.config import load_config
    from cast.data import build_loader
    from cast.train.config import TrainConfig

    global_batch = args.batch * args.workers
    overrides = [
        f"seed={seed}",
        f"data.shards={shards}",
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch}",
        f"data.seed={seed}",
        f"model.kwargs={{img_size: {args.size}}}",
        f"optim.base_lr={args.lr}",
        f"optim.base_batch={global_batch}",  # so the peak lr is exactly --lr
        f"ray.num_workers={args.workers}",
        f"ray.storage_path={storage}",
        f"ray.name={provider}-seed{seed}",
        "ray.max_failures=0",
        "checkpoint.every_steps=0",
        "checkpoint.keep=1",
        "logging.every_steps=25",
        "logging.tensorboard=false",
        *args.set,
    ]
    cfg = load_config(TrainConfig, str(CONFIG), overrides)
    cfg.data.superpixels = provider
    cfg.data.superpixel_params = provider_params(provider, args.num_superpixels)
    per_epoch = len(
        build_loader(dataclasses.replace(cfg.data, superpixels=""), rank=0, world_size=args.workers, epoch=0)
    )
    cfg.schedule.epochs = max(1, math.ceil(args.steps / per_epoch))
    cfg.schedule.warmup_epochs = args.warmup * cfg.schedule.epochs
    return cfg, per_epoch * cfg.schedule.epochs


def pretrain(cfg) -> dict:
    """One fresh run of ``cast.train``'s driver (``fit``'s steps, plus a callback that keeps every report);
    wall time and the training metrics."""
    from cast.train.driver import build_trainer, resolve, save_resolved_config

    resolve(cfg)
    folder = cfg.run_folder()
    shutil.rmtree(folder, ignore_errors=True)  # the same name would resume the old run
    save_resolved_config(cfg)
    history_path = Path(folder) / "benchmark_metrics.jsonl"
    started = time.perf_counter()
    result = build_trainer(cfg, callbacks=[MetricsLog(str(history_path))]).fit()
    wall = time.perf_counter() - started
    history = [json.loads(line) for line in history_path.read_text().splitlines()]
    later = history[1:] or history  # the first window includes the workers' start-up
    return {
        "run": folder,
        "wall_s": wall,
        "steps": int(result.metrics["step"]),
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "loss_curve": [(h["step"], h["loss"]) for h in history],
        "train_samples_per_s": statistics.median(h["images_per_s"] for h in later),
        "data_wait_frac": statistics.median(h["data_wait_frac"] for h in later),
    }


class MetricsLog(UserCallback):
    """Appends rank 0's metrics of every report to a JSON-lines file (callbacks run in Ray's controller
    process, and ``Result.metrics_dataframe`` only holds the reports of kept checkpoints)."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as handle:
            handle.write(
                json.dumps({k: v for k, v in metrics[0].items() if isinstance(v, int | float)}) + "\n"
            )


def knn(
    checkpoint: str | None, provider: str, args: argparse.Namespace, bank: str, val: str, seed: int
) -> dict:
    """Weighted kNN top-1/top-5 of the encoder at ``checkpoint`` (None: random init drawn with ``seed``,
    the draw the runs start from) with superpixels from ``provider``."""
    from cast.eval import KnnTask, LoaderSpec, ModelSpec, RunSettings, run_tasks

    data = LoaderSpec("eval", args.size, 64, args.eval_workers, provider,
                      provider_params(provider, args.num_superpixels))
    model = ModelSpec(MODEL, checkpoint, seed, {"img_size": args.size})
    features = tempfile.mkdtemp(prefix="knn-features-")
    try:
        task = KnnTask(model, data, bank, val, features=features, k=args.knn_k)
        return run_tasks([task], RunSettings(num_workers=0))[0]
    finally:
        shutil.rmtree(features, ignore_errors=True)


def start_ray(num_cpus: int):
    """An in-process local cluster on 127.0.0.1 (as the tests' ``ray_local``)."""
    from cast.local_ray import RAY_ENV

    os.environ.update(RAY_ENV)
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=512 * 1024**2,
        log_to_driver=True,
    )
    return ray


def summarise(
    args: argparse.Namespace,
    bank: str,
    val: str,
    steps: int,
    seeds: dict,
    loader: dict,
    cost: dict,
    load: list[float],
) -> dict:
    """The JSON record: setup, per-seed runs and kNN scores, means, data-path costs."""
    entries = list(seeds.values())
    own = {p: [e["knn"][p][p]["top1"] for e in entries] for p in PROVIDERS}
    return {
        "setup": {
            "model": MODEL,
            "config": str(CONFIG),
            "size": args.size,
            "steps": steps,
            "requested_steps": args.steps,
            "global_batch": args.batch * args.workers,
            "workers": args.workers,
            "lr": args.lr,
            "warmup": args.warmup,
            "num_superpixels": args.num_superpixels,
            "knn_k": args.knn_k,
            "train_images": 10 * args.train_per_class,
            "val_images": 10 * args.val_per_class,
            "train_shards": bank,
            "val_shards": val,
            "seeds": list(seeds),
            "overrides": args.set,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_1m": {"start": load[0], "end": os.getloadavg()[0]},
        },
        "seeds": seeds,
        "mean_top1_own_provider": {p: statistics.mean(v) for p, v in own.items()},
        "mean_top1_random": statistics.mean(
            e["knn"]["random"][p]["top1"] for e in entries for p in PROVIDERS
        ),
        "fast_minus_seeds_top1": [f - s for f, s in zip(own["seeds_fast"], own["seeds"])],
        "loader": loader,
        "provider_cost": cost,
    }


def format_report(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"superpixel provider check: {MODEL} MoCo on Fashion-MNIST {setup['size']} px, "
        f"{setup['train_images']} train images, {setup['steps']} steps x {setup['global_batch']} "
        f"(peak lr {setup['lr']:g}, {setup['workers']} Ray workers), {setup['num_superpixels']} superpixels "
        "requested",
        f"kNN top-1 % (k={setup['knn_k']}, weighted; bank = the {setup['train_images']} train images, "
        f"val = {setup['val_images']} test images), evaluated with:",
        f"{'seed':>4}  {'model':<24}{'own':>7}{'seeds':>7}{'fast':>7}"
        f"{'wall s':>8}{'samples/s':>10}{'data wait':>10}   loss first->last",
    ]
    for seed, entry in report["seeds"].items():
        for model in (*PROVIDERS, "random"):
            scores = entry["knn"][model]
            label = f"trained with {model}" if model in PROVIDERS else "random init (start)"
            own = f"{scores[model]['top1']:.2f}" if model in PROVIDERS else "-"
            row = f"{seed:>4}  {label:<24}{own:>7}" + "".join(f"{scores[p]['top1']:>7.2f}" for p in PROVIDERS)
            if model in PROVIDERS:
                run = entry["runs"][model]
                row += (
                    f"{run['wall_s']:>8.0f}{run['train_samples_per_s']:>10.1f}{run['data_wait_frac']:>10.2f}"
                    f"   {run['first_loss']:.3f}->{run['final_loss']:.3f}"
                )
            lines.append(row)
    mean = report["mean_top1_own_provider"]
    diffs = ", ".join(f"{d:+.2f}" for d in report["fast_minus_seeds_top1"])
    lines.append(
        f"mean kNN top-1, own provider: seeds {mean['seeds']:.2f}, seeds_fast {mean['seeds_fast']:.2f}, "
        f"random init {report['mean_top1_random']:.2f}; seeds_fast - seeds per seed: {diffs}"
    )
    lines.append("data path on one core (median of interleaved rounds):")
    for variant, row in report["loader"].items():
        line = (
            f"  loader {variant:<13}{row['samples_per_s_cpu']:>7.1f} MoCo samples/s (cpu), "
            f"{row['samples_per_s_wall']:.1f} (wall)"
        )
        if variant in report["provider_cost"]:
            cost = report["provider_cost"][variant]
            line += (
                f"; {cost['ms_per_view']:.3f} ms/view, superpixels per view {cost['labels_map_median']:g} "
                f"(min {cost['labels_map_min']}), on the token grid {cost['labels_grid_median']:g} "
                f"(min {cost['labels_grid_min']}); {cost['params']}"
            )
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.superpixel_knn", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--steps", type=int, default=300, help="optimizer steps per run (rounded up to epochs)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pair of runs per seed")
    parser.add_argument("--size", type=int, default=64, help="image size (px)")
    parser.add_argument("--num-superpixels", type=int, default=36, help="requested from both providers")
    parser.add_argument(
        "--train-per-class", type=int, default=320, help="train images per class (MoCo + bank)"
    )
    parser.add_argument("--val-per-class", type=int, default=200, help="test images per class (kNN val)")
    parser.add_argument("--batch", type=int, default=16, help="per worker")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (1 CPU each)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up share of the steps")
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--eval-workers", type=int, default=1, help="DataLoader workers for kNN features")
    parser.add_argument("--loader-batches", type=int, default=8, help="batches of 32 per throughput round")
    parser.add_argument("--loader-rounds", type=int, default=3)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra training-config override for both runs (repeatable)",
    )
    parser.add_argument("--out", default="outputs/superpixel_knn", help="folder for data, runs and results")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # 2 cores: one for the model, one for the eval loader worker / Ray workers
    cv2.setNumThreads(1)
    load = os.getloadavg()
    root = Path(args.out).resolve()
    bank = prepare_data(root, args.size, "train", args.train_per_class)
    val = prepare_data(root, args.size, "test", args.val_per_class)
    loader, views = loader_throughput(
        bank, args.size, args.num_superpixels, args.loader_batches, args.loader_rounds
    )
    cost = provider_cost(views, args.num_superpixels, args.loader_rounds)

    ray = start_ray(max(2, args.workers))
    results = root / "results.json"
    seeds: dict[str, dict] = {}
    try:
        for seed in args.seeds:
            runs = {}
            for provider in PROVIDERS:
                cfg, steps = train_config(args, bank, provider, seed, root / "runs")
                runs[provider] = pretrain(cfg)
                print(f"[superpixel_knn] seed {seed} {provider}: {runs[provider]}", flush=True)
            scores = {
                model: {
                    provider: knn(
                        runs[model]["run"] if model in runs else None, provider, args, bank, val, seed
                    )
                    for provider in PROVIDERS
                }
                for model in (*PROVIDERS, "random")
            }
            seeds[str(seed)] = {"runs": runs, "knn": scores}
            report = summarise(args, bank, val, steps, seeds, loader, cost, load)
            results.write_text(json.dumps(report, indent=2) + "\n")  # after every seed: partial runs count
            print(format_report(report), flush=True)
    finally:
        ray.shutdown()
    print(f"results: {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
