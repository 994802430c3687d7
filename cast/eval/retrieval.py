"""Unsupervised semantic segmentation by segment retrieval (reference section 5.5, the VOC protocol).

1. Each image is cut into segments (for CAST: the argmax chain of its assignment logits up to a level).
2. A segment's prototype is the L2-normalised sum of the L2-normalised embeddings of its pixels (a
   per-superpixel embedding counts once per pixel it covers).
3. Memory bank: the prototypes of the training images, each labelled by the majority ground-truth label
   of its pixels, the ignore label included in the count; prototypes whose majority is the ignore label
   are dropped (as the original does).
4. Each test segment takes the majority label of its ``k`` = 20 most cosine-similar bank prototypes,
   painted onto its pixels; the result is scored by mIoU.

Everything here takes plain tensors, so any model that gives per-unit (pixel or superpixel) embeddings
and segment maps can be evaluated; ``cast_segmented_images`` gets them from a CAST model (the MoCo
projector per superpixel token, as the reference, or the fused tokens), ``retrieval_view`` prepares
the reference's input (longer side 512), and ``cast.eval.tasks.RetrievalTask`` runs the protocol over
Ray workers with the bank in storage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cast.eval.features import batch_views
from cast.eval.knn import nearest_neighbours
from cast.eval.segmentation import IGNORE_INDEX, SegmentationMeter
from cast.superpixels import SuperpixelProvider

DEFAULT_TOP_K = 20
EMBEDDINGS = ("projector", "fused", "tokens")


@dataclass
class SegmentedImage:
    """One image for retrieval. ``embeddings`` [U, D] describe units (superpixels, or pixels with
    ``units = arange(H*W).view(H, W)``); ``units`` [H, W] gives each pixel's unit; ``segments`` [H, W]
    its segment; ``mask`` [H, W] the ground truth (needed for bank images and for scoring);
    ``valid_units`` [U] bool leaves units without a trustworthy embedding (CAST's padded tokens) out."""

    embeddings: torch.Tensor
    units: torch.Tensor
    segments: torch.Tensor
    mask: torch.Tensor | None = None
    valid_units: torch.Tensor | None = None
    key: str = ""

    def __post_init__(self) -> None:
        if self.embeddings.dim() != 2:
            raise ValueError(f"{self.key or 'image'}: embeddings must be [U, D], "
                             f"got {tuple(self.embeddings.shape)}")
        shapes = {"units": self.units.shape, "segments": self.segments.shape}
        if self.mask is not None:
            shapes["mask"] = self.mask.shape
        if len(set(shapes.values())) != 1 or self.units.dim() != 2:
            raise ValueError(f"{self.key or 'image'}: units, segments and mask must be the same [H, W]; "
                             f"got {({k: tuple(v) for k, v in shapes.items()})}")
        if int(self.units.max()) >= self.embeddings.shape[0] or int(self.units.min()) < 0:
            raise ValueError(f"{self.key or 'image'}: unit labels must index the {self.embeddings.shape[0]} "
                             f"embeddings, got {int(self.units.min())}..{int(self.units.max())}")


def segment_prototypes(image: SegmentedImage) -> tuple[torch.Tensor, torch.Tensor]:
    """(prototypes [S, D] float, compact segment map [H, W] with labels 0..S-1 in order of segment id).

    A (segment, unit) pixel-count matrix times the normalised unit embeddings sums the pixel embeddings
    without materialising a [H*W, D] tensor.
    """
    segment_ids, compact = torch.unique(image.segments.long(), return_inverse=True)
    num_segments, num_units = segment_ids.numel(), image.embeddings.shape[0]
    units = image.units.long().to(compact.device)
    pairs = torch.bincount((compact * num_units + units).flatten(), minlength=num_segments * num_units)
    counts = pairs.view(num_segments, num_units).float()
    if image.valid_units is not None:
        counts = counts * image.valid_units.to(counts.device).float()[None]
    embeddings = F.normalize(image.embeddings.float(), dim=1).to(counts.device)
    return F.normalize(counts @ embeddings, dim=1), compact


def majority_labels(compact_segments: torch.Tensor, mask: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Most frequent ground-truth value per segment (int64 [S]); the ignore label counts like any other,
    ties go to the smaller value."""
    mask = mask.long().to(compact_segments.device)
    if int(mask.min()) < 0:
        raise ValueError("majority_labels: ground-truth labels must be >= 0")
    num_values = int(mask.max()) + 1
    counts = torch.bincount((compact_segments * num_values + mask).flatten(),
                            minlength=num_segments * num_values)
    return counts.view(num_segments, num_values).argmax(dim=1)


@dataclass
class MemoryBank:
    prototypes: torch.Tensor  # [M, D], unit norm
    labels: torch.Tensor      # [M] int64, no ignore label
    dropped: int = 0          # segments whose majority label was the ignore label
    images: int = 0


def bank_prototypes(images: Iterable[SegmentedImage], ignore_index: int = IGNORE_INDEX
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str], int]:
    """(prototypes [M, D], majority labels [M], image key per prototype, segments dropped because their
    majority is the ignore label) of every segment of the labelled ``images``, on CPU."""
    prototypes, labels, keys, dropped = [], [], [], 0
    for image in images:
        if image.mask is None:
            raise ValueError(f"{image.key or 'image'}: memory-bank images need a ground-truth mask")
        image_prototypes, compact = segment_prototypes(image)
        image_labels = majority_labels(compact, image.mask, image_prototypes.shape[0])
        keep = image_labels != ignore_index
        dropped += int((~keep).sum())
        prototypes.append(image_prototypes[keep].cpu())
        labels.append(image_labels[keep].cpu())
        keys.extend([image.key] * int(keep.sum()))
    if not prototypes:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), keys, dropped
    return torch.cat(prototypes), torch.cat(labels), keys, dropped


def build_memory_bank(images: Iterable[SegmentedImage], ignore_index: int = IGNORE_INDEX) -> MemoryBank:
    """Prototypes and majority labels of every segment of the (labelled) bank images."""
    prototypes, labels, keys, dropped = bank_prototypes(images, ignore_index)
    if len(labels) == 0:
        raise ValueError("build_memory_bank: no labelled segment (empty data set, or every segment is "
                         f"mostly ignore label {ignore_index})")
    return MemoryBank(prototypes, labels, dropped, len(set(keys)))


def retrieve_labels(prototypes: torch.Tensor, bank: MemoryBank, num_classes: int,
                    k: int = DEFAULT_TOP_K) -> torch.Tensor:
    """Majority label of each prototype's ``k`` most cosine-similar bank prototypes (ties: lower label);
    the bank is searched in blocks (``nearest_neighbours``), so it may be of any size."""
    k = min(k, bank.prototypes.shape[0])
    bank_prototypes = bank.prototypes.to(prototypes.device)
    neighbours = nearest_neighbours(bank_prototypes, prototypes.to(bank_prototypes.dtype), k)[1]
    votes = torch.zeros(prototypes.shape[0], num_classes, device=prototypes.device)
    neighbour_labels = bank.labels.to(prototypes.device)[neighbours]
    votes.scatter_add_(1, neighbour_labels, torch.ones_like(neighbours, dtype=votes.dtype))
    return votes.argmax(dim=1)


def predict(image: SegmentedImage, bank: MemoryBank, num_classes: int,
            k: int = DEFAULT_TOP_K) -> torch.Tensor:
    """Semantic prediction [H, W]: every pixel takes its segment's retrieved label."""
    prototypes, compact = segment_prototypes(image)
    return retrieve_labels(prototypes, bank, num_classes, k)[compact]


def evaluate_retrieval(
    bank_images: Iterable[SegmentedImage],
    test_images: Iterable[SegmentedImage],
    num_classes: int,
    k: int = DEFAULT_TOP_K,
    ignore_index: int = IGNORE_INDEX,
    class_names: list[str] | None = None,
    boundary_tolerance: int = 2,
) -> dict:
    """Build the bank, predict every test image, and score: mIoU (dataset and per image), pixel accuracy,
    per-class IoU and boundary recall of the test segments against ground-truth edges."""
    bank = build_memory_bank(bank_images, ignore_index)
    if int(bank.labels.max()) >= num_classes:
        raise ValueError(f"evaluate_retrieval: bank label {int(bank.labels.max())} "
                         f">= num_classes {num_classes}")
    meter = SegmentationMeter(num_classes, ignore_index)
    for image in test_images:
        if image.mask is None:
            raise ValueError(f"{image.key or 'image'}: test images need a ground-truth mask to be scored")
        meter.update(predict(image, bank, num_classes, k), image.mask, image.segments, boundary_tolerance)
    result = meter.result(class_names)
    result.update({"k": min(k, len(bank.labels)), "bank_prototypes": len(bank.labels),
                   "bank_images": bank.images, "bank_dropped_ignore": bank.dropped})
    return result


def unit_embeddings(output, embedding: str, projector: torch.nn.Module | None = None) -> torch.Tensor:
    """Per-superpixel embeddings [B, N_1, D] of a CAST output: ``fused`` (BlockFusion tokens of the
    dense/pretrain variants, C-d), ``projector`` (the fused tokens through the MoCo projector, one token
    at a time: 256-d, what the reference retrieves with) or ``tokens`` (first-stage tokens, any variant)."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding {embedding!r}: expected one of {EMBEDDINGS}")
    if embedding == "tokens":
        return output.tokens[0]
    if output.dense_tokens is None:
        raise ValueError(f"embedding {embedding!r} needs a dense or pretrain CAST variant (fused tokens); "
                         "this model has none: use embedding 'tokens' or a cast_seg_* model")
    if embedding == "fused":
        return output.dense_tokens
    if projector is None:
        raise ValueError("embedding 'projector' needs the MoCo projector of the checkpoint")
    batch, tokens, channels = output.dense_tokens.shape
    return projector(output.dense_tokens.reshape(-1, channels).float()).view(batch, tokens, -1)


@torch.no_grad()
def cast_segmented_images(model, images: torch.Tensor, superpixels: torch.Tensor,
                          masks: torch.Tensor | None = None, level: int | None = None,
                          keys: list[str] | None = None, *, projector: torch.nn.Module | None = None,
                          embedding: str | None = None) -> list[SegmentedImage]:
    """Run a CAST model on a batch and cut it into ``SegmentedImage``s (on CPU).

    Segments: the hierarchy at ``level`` (1-based; default the top level, every level's assignment
    chained). Unit embeddings: ``unit_embeddings`` of ``embedding`` (default: ``fused`` for
    dense/pretrain variants, else ``tokens``); padded tokens (superpixels the token grid missed) are
    left out of the prototypes.
    """
    from cast.models import hierarchy  # the metrics above never need the model package

    output = model.forward_features(images, superpixels, segmentation=True)
    levels = hierarchy(output, superpixels)
    level = levels.shape[1] if level is None else level
    if not 1 <= level <= levels.shape[1]:
        raise ValueError(f"cast_segmented_images: level {level} outside 1..{levels.shape[1]}")
    if embedding is None:
        embedding = "fused" if output.dense_tokens is not None else "tokens"
    embeddings = unit_embeddings(output, embedding, projector)
    padding = output.padding_masks[0]
    result = []
    for index in range(images.shape[0]):
        result.append(SegmentedImage(
            embeddings=embeddings[index].float().cpu(),
            units=superpixels[index].long().cpu(),
            segments=levels[index, level - 1].cpu(),
            mask=None if masks is None else masks[index].long().cpu(),
            valid_units=(~padding[index]).cpu(),
            key=keys[index] if keys else "",
        ))
    return result


def view_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the longer side ``long_side`` and the shorter one scaled alike, both rounded to the
    stem's stride of 8 (the original's stem pads odd sizes inside its convolutions; ours needs
    multiples of 8, so the aspect ratio moves by at most 4 px)."""
    scale = long_side / max(height, width)
    return (max(8, round(height * scale / 8) * 8), max(8, round(width * scale / 8) * 8))


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of an integer map [..., H, W] to ``size`` (as cv2.INTER_NEAREST / F.interpolate)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    shape = labels.shape
    flat = labels.reshape(-1, 1, *shape[-2:]).float()
    return F.interpolate(flat, size=tuple(size), mode="nearest").long().reshape(*shape[:-2], *size)


def retrieval_view(batch: dict, device: str | torch.device, long_side: int,
                   provider: SuperpixelProvider | None = None) -> tuple[torch.Tensor, ...]:
    """(images [B, 3, h, w], superpixels [B, h, w], masks [B, h, w]) of a loader batch, resized so the
    longer side is ``long_side`` (0: kept, rounded to the stride): images bilinearly, superpixels and
    masks by nearest neighbour, as SPML prepares its retrieval input (SEEDS on the image as stored,
    the label maps resized). Batches of several images must share their size."""
    images, superpixels = batch_views(batch, device, provider)
    masks = batch["mask"].to(images.device).long()
    height, width = images.shape[-2:]
    size = view_size(height, width, long_side or max(height, width))
    if size != (height, width):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        superpixels, masks = resize_labels(superpixels, size), resize_labels(masks, size)
    return images, superpixels, masks

