"""Dense fine-tuning step and sliding-window evaluation: CAST-S + mask transformer against Segmenter's
ViT-S/16 with its linear and mask-transformer decoders, side by side in one run.

    python -m benchmarks.dense                          # CPU: 256 px (the paper's 512 with --size 512)
    python -m benchmarks.dense --device cuda --size 512 --batch 8 --iters 20    # bf16 autocast on a GPU

Step = forward + backward of per-pixel cross-entropy (150 classes, ADE20K's count) at ``--size``.
``cast_seg_small`` gets H*W/256 superpixels (a jittered grid, as SEEDS gives; below 512 px its cluster
counts shrink with them); its decoder scores the
superpixel tokens and paints them. The ViT-S/16 (timm ``vit_small_patch16_224`` at ``--size``) decoders
score the 16-px patches and upsample bilinearly (Segmenter). The models take turns every iteration.
Evaluation: time per image of sliding windows (``--size`` windows, stride 2/3 of it) over a 4:3 image,
including CAST's per-window superpixels (``seeds_fast``, CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import timm
import torch
import torch.nn.functional as F
from torch import nn

import cast.models as cm
from benchmarks.model import jittered_grid, sync
from cast.eval.dense import predict_logits
from cast.models.decoders import DenseSegmenter, MaskTransformer
from cast.superpixels import get_provider


class PatchSegmenter(nn.Module):
    """Segmenter: ViT patch tokens -> linear or mask-transformer decoder -> scores upsampled to pixels."""

    def __init__(self, size: int, num_classes: int, decoder: str):
        super().__init__()
        self.encoder = timm.create_model("vit_small_patch16_224", img_size=size, num_classes=0)
        dim = self.encoder.embed_dim
        self.decoder = MaskTransformer(num_classes, dim) if decoder == "mask" else nn.Linear(dim, num_classes)
        self.mask = decoder == "mask"

    def forward(self, images: torch.Tensor, superpixels: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens:]
        scores = self.decoder(tokens) if self.mask else self.decoder(tokens)
        side_h, side_w = images.shape[-2] // 16, images.shape[-1] // 16
        grid = scores.transpose(1, 2).reshape(images.shape[0], -1, side_h, side_w)
        return F.interpolate(grid, size=images.shape[-2:], mode="bilinear", align_corners=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-images", type=int, default=2)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    torch.manual_seed(0)
    size, cells = args.size, args.size // 16
    scale = (size / 512) ** 2  # clusters follow the superpixel count below 512 px (paper: 320/160/80/40)
    clusters = tuple(max(2, round(k * scale)) for k in (320, 160, 80, 40))
    encoder = cm.create_model("cast_seg_small", img_size=size, num_clusters=clusters)
    models = {
        "cast_seg_small + mask transformer": DenseSegmenter(encoder, MaskTransformer(args.classes, 384)),
        "ViT-S/16 + mask transformer (Segmenter)": PatchSegmenter(size, args.classes, "mask"),
        "ViT-S/16 + linear (Segmenter)": PatchSegmenter(size, args.classes, "linear"),
    }
    models = {name: model.to(device).train() for name, model in models.items()}
    images = torch.randn(args.batch, 3, size, size, device=device)
    superpixels = jittered_grid(args.batch, size, cells=cells).to(device)
    target = torch.randint(0, args.classes, (args.batch, size, size), device=device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for iteration in range(args.iters + 1):
        for name, model in models.items():
            sync(device)
            start = time.perf_counter()
            with autocast():
                loss = F.cross_entropy(model(images, superpixels).float(), target)
            loss.backward()
            model.zero_grad(set_to_none=True)
            sync(device)
            if iteration:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    print(f"dense training step, batch {args.batch} at {size} px, {args.classes} classes, {device} "
          f"(median of {args.iters}):")
    base = statistics.median(times["ViT-S/16 + mask transformer (Segmenter)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:42s} {median * 1000:9.1f} ms  {median / base:5.2f}x  "
              f"{args.batch / median:6.2f} img/s")

    provider = get_provider("seeds_fast", num_superpixels=cells * cells)
    image = torch.randn(1, 3, size, size * 4 // 3, device=device)
    print(f"sliding-window evaluation of a {size}x{size * 4 // 3} image, window {size}, "
          f"stride {size * 2 // 3}:")
    for name, model in models.items():
        model.eval()
        started = time.perf_counter()
        with torch.no_grad(), autocast():
            for _ in range(args.eval_images):
                predict_logits(model, image, provider, size=size, window=size, stride=size * 2 // 3,
                               num_classes=args.classes)
        sync(device)
        print(f"  {name:42s} {(time.perf_counter() - started) / args.eval_images * 1000:9.1f} ms per image")


if __name__ == "__main__":
    main()
