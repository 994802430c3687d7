"""GPU figures, ready to take on whatever CUDA GPUs are present; without one both skip (exit 0).

    python -m benchmarks.gpu bench [--batch 128] [--iters 20] [--seconds 60]     # make bench-gpu
    python -m benchmarks.gpu smoke [--gpus N] [--steps 20]                       # make gpu-smoke
    python -m benchmarks.gpu {bench,smoke} --plan                                # print what would run

``bench``, side by side in one run on GPU 0: (1) ``benchmarks.model --device cuda --compile``: CAST-S
against timm's ViT-S/16, training step in bf16 (fp16 where the GPU lacks it), eager and compiled, and
the graph-pooling share; (2) ``slic_torch`` per batch of views on the device; (3) an end-to-end MoCo
step of CAST-S with the real loader (photo shards, seeds_fast in DataLoader workers): images/s, the
share of the step spent waiting for data, and the CPU cores per GPU the data path needs at that rate.

``smoke``: a local Ray head on 127.0.0.1 and two short ``ray job submit`` runs of ``jobs.pretrain``
(cast_tiny MoCo on photo shards, every local GPU a worker: NCCL when more than one, SyncBN, the
automatic precision, ``slic_torch`` on CUDA), one eager and one with ``model.compile=true``; prints
each run's wall time and final metrics.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cuda_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def model_command(args) -> list[str]:
    return [sys.executable, "-m", "benchmarks.model", "--device", "cuda", "--batch", str(args.batch),
            "--iters", str(args.iters), "--compile"]


def smoke_overrides(shards: str, runs: str, gpus: int, compiled: bool, steps: int) -> list[str]:
    """jobs.pretrain overrides of one smoke run (cast_tiny MoCo, one worker per GPU)."""
    return [
        f"data.shards={shards}", "data.superpixels=slic_torch", "data.superpixel_params={num_segments: 36}",
        "data.batch_size=32", "data.num_workers=2", f"optim.global_batch={32 * gpus}",
        "data.max_superpixels=36", "model.sync_bn=true", "model.precision=auto",
        f"model.compile={str(compiled).lower()}",
        "schedule.epochs=1", "schedule.warmup_epochs=0", f"logging.every_steps={max(1, steps // 4)}",
        "ray.use_gpu=true", f"ray.num_workers={gpus}", "ray.resources_per_worker={CPU: 2, GPU: 1}",
        f"ray.storage_path={runs}", f"ray.name=smoke_{'compiled' if compiled else 'eager'}",
        "logging.tensorboard=false",
    ]


def submit_command(address: str, overrides: list[str]) -> list[str]:
    return [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
            "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--",
            "python", "-m", "jobs.pretrain", "--config", "jobs/configs/moco_cast_tiny.yaml", *overrides]


def slic_rate(batch: int, size: int, repeats: int = 10) -> float:
    """Views per second of ``slic_torch`` on GPU 0, a batch at a time."""
    from cast.superpixels import get_provider

    provider = get_provider("slic_torch")
    images = torch.rand(batch, 3, size, size, device="cuda")
    provider.batch(images)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        provider.batch(images)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def moco_end_to_end(batch: int, seconds: float, workers: int) -> dict[str, float]:
    """CAST-S MoCo steps fed by the real loader: images/s, data-wait share, CPU cores per GPU needed."""
    import timm

    from benchmarks.data import build_photo_shards, moco_variant, photo_folder, source_jpegs
    from cast.data import DataConfig, build_loader
    from cast.data.batches import to_device
    from cast.data.transforms import MocoRecipe
    from cast.precision import resolve
    from cast.superpixels import get_provider
    from cast.train.config import MocoConfig
    from cast.train.objectives import MoCo

    device = torch.device("cuda")
    precision = resolve(device)
    model = MoCo(timm.create_model("cast_small", num_classes=0, num_tokens=196), MocoConfig()).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = precision.grad_scaler()
    with tempfile.TemporaryDirectory() as tmp:
        count = max(8 * workers, 4 * batch)
        build_photo_shards(photo_folder(Path(tmp), count), f"{tmp}/shards", count)
        cfg = DataConfig(shards=f"{tmp}/shards", recipe="moco", batch_size=batch, num_workers=workers,
                         superpixels="seeds_fast", max_superpixels=196, min_superpixels=64)
        waits, steps, images, epoch, start = 0.0, 0, 0, 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            batches = iter(build_loader(cfg, rank=0, world_size=1, epoch=epoch))
            while time.perf_counter() - start < seconds:
                t0 = time.perf_counter()
                raw = next(batches, None)
                waits += time.perf_counter() - t0
                if raw is None:
                    break
                on = to_device(raw, device)
                with precision.autocast():
                    loss = model(on["images"], on["superpixels"], 0.99)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                steps, images = steps + 1, images + batch
            epoch += 1
        wall = time.perf_counter() - start
    per_core = statistics.median(_per_core_rate(moco_variant(MocoRecipe(224), get_provider("seeds_fast")),
                                                source_jpegs(16)) for _ in range(3))
    rate = images / wall
    return {"images_per_s": rate, "data_wait_share": waits / wall, "steps": steps,
            "cpu_cores_per_gpu": rate / per_core, "per_core_samples_per_s": per_core}


def _per_core_rate(run, samples: list[bytes]) -> float:
    torch.set_num_threads(1)
    start = time.process_time()
    run(samples)
    return len(samples) / (time.process_time() - start)


def bench(args) -> int:
    print(f"$ {shlex.join(model_command(args))}", flush=True)
    if args.plan:
        print(f"then: slic_torch per batch of {args.batch} views at 224 px on cuda:0; an end-to-end CAST-S "
              f"MoCo step, batch {args.batch}, {args.workers} loader workers, for {args.seconds:.0f} s")
        return 0
    subprocess.run(model_command(args), cwd=REPO, check=True)
    print(f"slic_torch on {torch.cuda.get_device_name(0)}: {slic_rate(args.batch, 224):.0f} views/s "
          f"(batch {args.batch}, 224 px)")
    figures = moco_end_to_end(args.batch, args.seconds, args.workers)
    print("end-to-end CAST-S MoCo step (real loader, seeds_fast in workers): " +
          ", ".join(f"{k}={v:.3g}" for k, v in figures.items()))
    return 0


def smoke(args) -> int:
    from benchmarks.data import build_photo_shards, photo_folder
    from cast.local_ray import local_ray_head

    gpus = args.gpus or cuda_gpus()
    with tempfile.TemporaryDirectory() as tmp:
        shards, runs = f"{tmp}/shards", f"{tmp}/runs"
        runs_of = {c: smoke_overrides(shards, runs, gpus, c, args.steps) for c in (False, True)}
        if args.plan:
            for overrides in runs_of.values():
                print("$ " + shlex.join(submit_command("<head>", overrides)))
            return 0
        count = 32 * gpus * args.steps
        build_photo_shards(photo_folder(Path(tmp), count), shards, count)
        with local_ray_head(num_cpus=2 * gpus + 2) as head:
            for compiled, overrides in runs_of.items():
                start = time.perf_counter()
                subprocess.run(submit_command(head.address, overrides), cwd=REPO, env=head.env, check=True)
                wall = time.perf_counter() - start
                print(f"smoke run compile={compiled}: {wall:.1f} s wall on {gpus} GPU(s)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="CAST-S vs ViT-S/16, slic_torch, end-to-end MoCo step on GPU 0")
    b.add_argument("--batch", type=int, default=128)
    b.add_argument("--iters", type=int, default=20)
    b.add_argument("--seconds", type=float, default=60.0, help="end-to-end MoCo time budget")
    b.add_argument("--workers", type=int, default=8, help="DataLoader workers of the end-to-end step")
    s = sub.add_parser("smoke", help="two short ray job submit runs on the local GPUs (eager, compiled)")
    s.add_argument("--gpus", type=int, default=0, help="workers (0 = every local GPU)")
    s.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    for p in (b, s):
        p.add_argument("--plan", action="store_true", help="print what would run, run nothing")
    args = parser.parse_args(argv)
    for name in ("batch", "iters", "workers", "steps"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be >= 1")
    if getattr(args, "gpus", 0) < 0:
        parser.error("--gpus must be >= 0")
    if not args.plan and cuda_gpus() == 0:
        print(f"benchmarks.gpu {args.command}: no CUDA GPU visible to torch; skipped (nothing measured)")
        return 0
    if args.command == "smoke" and args.plan and not args.gpus:
        args.gpus = max(1, cuda_gpus())
    return bench(args) if args.command == "bench" else smoke(args)


if __name__ == "__main__":
    sys.exit(main())
