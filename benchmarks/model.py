"""Training-step throughput of CAST-S against ViT-S/16 baselines, side by side in one run.

    python -m benchmarks.model                      # CPU: batch 8 at 224 px, 5 timed steps per model
    python -m benchmarks.model --compile            # + CAST-S and ViT-S/16 under torch.compile
    python -m benchmarks.model --device cuda --batch 128 --iters 20 --compile   # bf16 autocast on a GPU

Models: ``cast_small`` (stride-8 conv stem, 196 jittered-grid superpixels, 11 blocks + 4 graph poolings),
timm's ``vit_small_patch16_224`` (patchify stem, 12 blocks) and ``vit_conv_small`` (the same conv stem at
stride 16 and 11 blocks, MoCo-v3's baseline). One step = forward + backward of a cross-entropy loss; the
models take turns every iteration so machine noise hits all of them alike. CAST-S runs with the token
budget of its recipe (``--token-budget 196``: static shapes, no host sync; 0 = the batch's largest label).
The CAST step is then split by timing its graph poolings and superpixel token pooling alone (forward +
backward) on the inputs they received in the step, and by profiler ranges of the forward pass.
Precision follows ``cast.precision``: bf16 autocast on GPUs with it (fp16 without), float32 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

import cast.models as cm
from cast.models.blocks import TransformerBlock
from cast.models.fps import sample_seeds
from cast.models.positions import sincos_2d_table
from cast.models.stem import ConvStem
from cast.models.superpixel_tokens import superpixel_tokens
from cast.precision import resolve


class ConvStemViT(nn.Module):
    """MoCo-v3 ``vit_conv_small``: conv stem at stride 16, 11 pre-norm blocks, fixed sin-cos positions."""

    def __init__(
        self, img_size: int, dim: int = 384, depth: int = 11, heads: int = 12, num_classes: int = 1000
    ):
        super().__init__()
        self.stem = ConvStem(dim, last_stride=2)
        self.register_buffer("pos", sincos_2d_table(img_size // 16, img_size // 16, dim).unsqueeze(0))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor, superpixels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stem(images).flatten(1, 2) + self.pos
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def jittered_grid(batch: int, size: int, cells: int = 14, jitter: int = 3, seed: int = 0) -> torch.Tensor:
    """cells x cells superpixels (196 at the default, as SEEDS gives at 224 px) with wavy borders."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.arange(size)
    maps = []
    for _ in range(batch):
        dy = torch.randint(-jitter, jitter + 1, (size, 1), generator=gen)
        dx = torch.randint(-jitter, jitter + 1, (1, size), generator=gen)
        rows = (coords[:, None] + dx).clamp(0, size - 1) * cells // size
        cols = (coords[None, :] + dy).clamp(0, size - 1) * cells // size
        maps.append(rows * cells + cols)
    return torch.stack(maps).long()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(model: nn.Module, images, superpixels, labels, autocast) -> None:
    with autocast():
        logits = model(images, superpixels)
        loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def capture_inputs(model: cm.CAST, images, superpixels, autocast) -> tuple[list, torch.Tensor]:
    """Inputs each graph pooling saw in a forward pass, and the stem features."""
    seen = []
    hooks = [p.register_forward_hook(lambda m, args, out: seen.append(args)) for p in model.pools]
    with torch.no_grad(), autocast():
        features = model.stem(images)
        model.forward_features(images, superpixels, segmentation=True)
    for hook in hooks:
        hook.remove()
    return seen, features


def component_times(model: cm.CAST, images, superpixels, autocast, device, repeats: int) -> dict[str, float]:
    """Median fwd+bwd seconds of the 4 graph poolings together, of FPS alone, and of token pooling."""
    pool_inputs, features = capture_inputs(model, images, superpixels, autocast)
    config = model.config
    table = model.pos_embed[0]

    trained = list(zip(model.pools, pool_inputs))[:-1]  # the last pooling is skipped in training

    def pools():
        total = 0.0
        with autocast():
            for pool, (cls, tokens, mask, compat) in trained:
                cls, tokens = cls.detach().requires_grad_(), tokens.detach().requires_grad_()
                out = pool(cls, tokens, mask, compat)
                total = total + out.tokens.float().sum() + out.cls.float().sum()
        total.backward()

    def fps_only():
        for pool, (_, tokens, mask, compat) in trained:
            sample_seeds(tokens, mask, pool.num_clusters, exact=compat)

    def token_pooling():
        feats = features.detach().float().requires_grad_()
        with autocast():
            tokens, _ = superpixel_tokens(
                feats, table, config.grid_size, superpixels, config.resolved_token_pooling
            )
        tokens.float().sum().backward()

    results = {}
    for name, fn in (("graph_pool_train", pools), ("fps", fps_only), ("segment_ops", token_pooling)):
        fn()
        results[name] = statistics.median(timed(fn, device) for _ in range(repeats))
    return results


def profile_forward_ranges(model, images, superpixels, labels, autocast, device) -> dict[str, float]:
    """Seconds inside each ``cast.*`` record_function range during one training step (forward ranges)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step(model, images, superpixels, labels, autocast)
        sync(device)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("cast."):
            on_device = getattr(event, "device_time_total", 0.0) if device.type == "cuda" else 0.0
            totals[event.key] = max(totals.get(event.key, 0.0), (on_device or event.cpu_time_total) / 1e6)
    return totals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    parser.add_argument("--token-budget", type=int, default=196, help="CAST-S num_tokens (0 = dynamic)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd CAST-S and ViT-S")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    precision = resolve(device)
    autocast = precision.autocast

    torch.manual_seed(0)
    budget = {"num_tokens": args.token_budget} if args.token_budget else {}
    models = {
        "cast_small": timm.create_model("cast_small", img_size=args.size, **budget),
        "vit_small_patch16_224": timm.create_model("vit_small_patch16_224", img_size=args.size),
        "vit_conv_small (conv stem /16)": ConvStemViT(args.size),
    }
    models = {name: m.to(device).train() for name, m in models.items()}
    if args.compile:  # compiled twins sharing the weights; the compile happens in the warm-up step
        models["cast_small (compiled)"] = torch.compile(models["cast_small"])
        models["vit_small_patch16_224 (compiled)"] = torch.compile(models["vit_small_patch16_224"])
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    superpixels = jittered_grid(args.batch, args.size).to(device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    calls = {
        name: (
            lambda m=m, timm_vit="patch16" in name: step(
                m if not timm_vit else _ImagesOnly(m), images, superpixels, labels, autocast
            )
        )
        for name, m in models.items()
    }
    for _ in range(args.warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.iters):
        for name, fn in calls.items():
            times[name].append(timed(fn, device))
    medians = {name: statistics.median(t) for name, t in times.items()}

    print(
        f"device={device} precision={precision.name} threads={torch.get_num_threads()} batch={args.batch} "
        f"size={args.size} iters={args.iters} token_budget={args.token_budget} "
        "(median step, forward+backward)"
    )
    cast_time = medians["cast_small"]
    for name, seconds in medians.items():
        print(
            f"  {name:32s} {seconds * 1e3:9.1f} ms/step  {args.batch / seconds:8.1f} img/s  "
            f"CAST-S/this = {cast_time / seconds:5.2f}x"
        )
    vit = medians["vit_small_patch16_224"]
    print(f"  CAST-S / ViT-S/16 eager: {cast_time / vit:.2f}x (goal <= 0.75 on CPU, <= 0.8 in bf16 on a GPU)")
    if args.compile:
        compiled = medians["cast_small (compiled)"]
        print(f"  CAST-S compiled / eager: {compiled / cast_time:.2f}x (goal <= 0.9); compiled CAST-S / "
              f"compiled ViT-S/16: {compiled / medians['vit_small_patch16_224 (compiled)']:.2f}x")
    parts = component_times(models["cast_small"], images, superpixels, autocast, device, max(args.iters, 2))
    print("CAST-S step split (components timed alone, forward+backward, same inputs):")
    print(
        f"  graph pooling x3 (trained path)  {parts['graph_pool_train'] * 1e3:8.1f} ms  "
        f"{100 * parts['graph_pool_train'] / cast_time:5.1f}% of the step"
    )
    print(f"    of which FPS                    {parts['fps'] * 1e3:8.1f} ms")
    print(
        f"  superpixel token pooling          {parts['segment_ops'] * 1e3:8.1f} ms  "
        f"{100 * parts['segment_ops'] / cast_time:5.1f}% of the step"
    )
    pooled = parts["graph_pool_train"] + parts["segment_ops"]
    print(f"  graph pooling + segment ops       {100 * pooled / cast_time:5.1f}% of the step (goal <= 15%)")
    ranges = profile_forward_ranges(models["cast_small"], images, superpixels, labels, autocast, device)
    print("profiler ranges in one step (forward only; backward kernels are not attributed to ranges):")
    for name, seconds in sorted(ranges.items()):
        print(f"  {name:20s} {seconds * 1e3:8.1f} ms")


class _ImagesOnly(nn.Module):
    """timm's ViT takes images only; drop the superpixels argument."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, superpixels=None):
        return self.model(images)


if __name__ == "__main__":
    main()
