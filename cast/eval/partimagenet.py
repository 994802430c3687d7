"""PartImageNet part/whole evaluation (reference section 5.7): CAST segments labelled by masked-image CLIP.

1. Every image is cut to the 224-px view (shorter side resized bicubically, centre crop; the masks by
   nearest neighbour) and segmented by CAST with SEEDS: coarse segments = level 4, fine = level 3.
2. ``ClipLabeller`` (OpenCLIP ViT-B/16, OpenAI weights, not fine-tuned) labels each segment from the
   CLIP embedding of the image with every pixel outside the segment set to 0.5 (in CLIP-normalised
   values), against the prompts "a photo of a {name}": coarse segments take one of the 11
   super-categories or "Background"; a fine segment takes one of the parts of the object predicted at
   its first pixel (row-major), or background when that pixel's object is background.
3. Per image, the mean IoU over the classes present in its truth or prediction (12 object classes,
   41 part classes, background last; torchmetrics' ``JaccardIndex`` macro average, which a test checks
   against ours), averaged over images. The original skips failing images silently; here a failed
   image is counted and named.
4. The oracle: the same labeller on the ground-truth object and part regions, which bounds what any
   segmenter can reach with this labeller.

The shards (``data_tools.layouts`` ``partimagenet``) hold the part of every pixel in ``seg.png``, and
name their classes ``<super-category>/<part>`` (+ ``background`` last), so the object of every part
travels with the data.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from cast.data import ShardSetError, read_manifest
from cast.data.batches import to_device
from cast.data.transforms import denormalize, normalize
from cast.eval.distributed import WorkerContext
from cast.eval.images import centre_view
from cast.eval.segmentation import confusion_matrix, mean_iou
from cast.eval.tasks import LoaderSpec, ModelSpec, _limit, _skip_counts, _summed_counts
from cast.models import hierarchy
from cast.storage import is_url

log = logging.getLogger(__name__)

BACKGROUND = "background"
OBJECT_BACKGROUND_PROMPT = "Background"  # the original's word for the 12th object class
PROMPT = "a photo of a {}"
MASK_VALUE = 0.5  # what the original writes outside a segment, in CLIP-normalised values


@dataclass(frozen=True)
class PartVocabulary:
    """Objects (super-categories) and parts of a ``partimagenet`` shard set; background is the last
    index of both."""

    objects: tuple[str, ...]
    parts: tuple[str, ...]
    part_object: tuple[int, ...]  # object index of every part

    @classmethod
    def from_classes(cls, classes: list[str], source: str = "classes") -> PartVocabulary:
        if not classes or classes[-1] != BACKGROUND or any("/" not in name for name in classes[:-1]):
            raise ShardSetError(f"{source}: expected classes '<super-category>/<part>' ending in "
                                f"'{BACKGROUND}' (a partimagenet layout), got {classes[:3]}...")
        objects: list[str] = []
        parts, part_object = [], []
        for name in classes[:-1]:
            obj, part = name.split("/", 1)
            if obj not in objects:
                objects.append(obj)
            parts.append(part)
            part_object.append(objects.index(obj))
        return cls(tuple(objects), tuple(parts), tuple(part_object))

    @property
    def object_background(self) -> int:
        return len(self.objects)

    @property
    def part_background(self) -> int:
        return len(self.parts)

    def parts_of(self, obj: int) -> list[int]:
        return [index for index, owner in enumerate(self.part_object) if owner == obj]

    def object_map(self, part_map: torch.Tensor) -> torch.Tensor:
        """The object of every pixel of a part map (background stays background)."""
        table = torch.tensor([*self.part_object, self.object_background], device=part_map.device)
        return table[part_map.long()]


def load_clip(name: str, weights: str | None, device: str | torch.device = "cpu"):
    """(OpenCLIP model in eval mode, tokenizer). ``weights``: a local file or any fsspec URL (fetched to
    a temporary file); None builds the architecture with random weights (tests, smoke runs): nothing is
    ever downloaded from a model hub."""
    import open_clip

    if weights is not None and is_url(weights):
        with tempfile.TemporaryDirectory(prefix="cast-clip-") as folder:
            local = os.path.join(folder, os.path.basename(weights.rstrip("/")) or "weights.bin")
            _fetch(weights, local)
            model = open_clip.create_model(name, pretrained=local, device=device)
    else:
        if weights is not None and not os.path.isfile(weights):
            raise FileNotFoundError(f"--clip-weights {weights}: no such file")
        model = open_clip.create_model(name, pretrained=weights, device=device)
    return model.eval(), open_clip.get_tokenizer(name)


def _fetch(url: str, local: str) -> None:
    with fsspec.open(url, "rb") as source, open(local, "wb") as target:
        while chunk := source.read(1 << 24):
            target.write(chunk)


class ClipLabeller:
    """Open-vocabulary labels of segments from masked-image CLIP embeddings (see the module doc)."""

    def __init__(self, model, tokenizer, vocabulary: PartVocabulary, device: str | torch.device = "cpu",
                 batch_size: int = 16, prompt: str = PROMPT):
        self.model, self.vocabulary, self.batch_size = model.to(device).eval(), vocabulary, batch_size
        self.device = torch.device(device)
        visual = model.visual
        self.size = tuple(visual.image_size) if isinstance(visual.image_size, tuple | list) else (
            visual.image_size, visual.image_size)
        self.mean = torch.tensor(visual.image_mean, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(visual.image_std, device=self.device).view(3, 1, 1)
        self.object_text = self._text([*vocabulary.objects, OBJECT_BACKGROUND_PROMPT], tokenizer, prompt)
        self.part_text = [
            self._text([vocabulary.parts[p] for p in vocabulary.parts_of(obj)], tokenizer, prompt)
            for obj in range(len(vocabulary.objects))
        ]

    @torch.no_grad()
    def _text(self, names: list[str], tokenizer, prompt: str) -> torch.Tensor:
        tokens = tokenizer([prompt.format(name) for name in names]).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def prepare(self, view: np.ndarray) -> torch.Tensor:
        """A uint8 [H, W, 3] view -> CLIP-normalised float [3, H, W] on the device."""
        image = torch.from_numpy(np.ascontiguousarray(view)).to(self.device).permute(2, 0, 1).float() / 255
        return (image - self.mean) / self.std

    def masked_images(self, image: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(segment ids [S], images [S, 3, h, w] at CLIP's input size): each image keeps one segment and
        has ``MASK_VALUE`` everywhere else (masking at the view's resolution, then resized bicubically
        when the view is not CLIP's size)."""
        ids = torch.unique(segments)
        inside = segments.to(self.device)[None] == ids.to(self.device)[:, None, None]  # [S, H, W]
        images = torch.where(inside[:, None], image[None], torch.full_like(image[None], MASK_VALUE))
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="bicubic", align_corners=False)
        return ids, images

    @torch.no_grad()
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        out = [self.model.encode_image(images[i:i + self.batch_size]).float()
               for i in range(0, images.shape[0], self.batch_size)]
        return F.normalize(torch.cat(out), dim=-1)

    def label_objects(self, image: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """Object class [H, W] of every pixel: its segment's best prompt among objects + Background."""
        ids, images = self.masked_images(image, segments)
        choice = (self._embed(images) @ self.object_text.T).argmax(dim=1)
        return _paint(segments.to(self.device), ids.to(self.device), choice)

    def label_parts(self, image: torch.Tensor, segments: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        """Part class [H, W]: each segment's best part of the object predicted at its first pixel
        (row-major), part background where that object is background."""
        segments, objects = segments.to(self.device), objects.to(self.device)
        ids, images = self.masked_images(image, segments)
        flat = segments.flatten()
        inverse = torch.searchsorted(ids.to(self.device), flat)
        positions = torch.arange(flat.numel(), device=self.device)
        first = torch.full((len(ids),), flat.numel(), device=self.device).scatter_reduce_(
            0, inverse, positions, "amin")  # the first pixel of every segment, row-major
        owners = objects.flatten()[first]
        features = self._embed(images)
        choice = torch.full_like(ids, self.vocabulary.part_background)
        for index, owner in enumerate(owners.tolist()):
            if owner < len(self.vocabulary.objects):
                allowed = self.vocabulary.parts_of(owner)
                choice[index] = allowed[int((features[index] @ self.part_text[owner].T).argmax())]
        return _paint(segments, ids.to(self.device), choice.to(self.device))


def _paint(segments: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Every pixel takes the label of its segment (``ids`` sorted, as ``torch.unique`` returns them)."""
    return labels[torch.searchsorted(ids, segments)]


def image_miou(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> float:
    """Mean IoU of one image over the classes present in its truth or prediction."""
    return mean_iou(confusion_matrix(pred, truth, num_classes))


def label_and_score(labeller: ClipLabeller, image: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor,
                    truth_parts: torch.Tensor) -> dict:
    """Object and part mIoU of one image whose coarse and fine segments are given."""
    vocabulary = labeller.vocabulary
    truth_parts = truth_parts.to(labeller.device).long()
    objects = labeller.label_objects(image, coarse)
    parts = labeller.label_parts(image, fine, objects)
    truth_objects = vocabulary.object_map(truth_parts)
    return {"object_miou": image_miou(objects, truth_objects, len(vocabulary.objects) + 1),
            "part_miou": image_miou(parts, truth_parts, len(vocabulary.parts) + 1)}


@dataclass
class PartWholeTask:
    """PartImageNet object/part mIoU of CAST segments labelled by CLIP, and the ground-truth oracle."""

    model: ModelSpec
    data: LoaderSpec  # recipe segmentation_eval (image and part mask as stored), batch 1, no superpixels
    shards: str
    clip_model: str = "ViT-B-16-quickgelu"  # the OpenAI ViT-B/16 (QuickGELU) the reference labels with
    clip_weights: str | None = None  # local file or URL; None: random CLIP (smoke runs and tests only)
    view_size: int = 224
    coarse_level: int = 4
    fine_level: int = 3
    superpixels: str = "seeds"
    superpixel_params: dict = field(default_factory=lambda: {"preset": "moco"})  # SEEDS 196, 15 bins, 20 it
    oracle: bool = True
    clip_batch: int = 16
    name: str = "partimagenet"

    def validate(self, world_size: int = 1) -> None:
        manifest = self.data.check_shards(self.shards, "--part-shards", self.name, world_size)
        PartVocabulary.from_classes(manifest.classes, manifest.url)
        from cast.models import cast_config

        levels = len(self.model.options.get("num_clusters") or cast_config(self.model.name).num_clusters)
        if not all(1 <= level <= levels for level in (self.coarse_level, self.fine_level)):
            raise ValueError(f"partimagenet: --coarse-level {self.coarse_level} / --fine-level "
                             f"{self.fine_level} outside 1..{levels}, the levels of {self.model.name}")

    def _image(self, model, labeller: ClipLabeller, provider, image: torch.Tensor, mask: torch.Tensor,
               device: torch.device) -> tuple[dict, dict | None]:
        """(CAST scores, oracle scores or None) of one image as the loader gives it (stored size)."""
        view = centre_view((denormalize(image) * 255).round().byte().permute(1, 2, 0).cpu().numpy(),
                           self.view_size)
        truth = torch.from_numpy(centre_view(mask.numpy().astype(np.uint8), self.view_size, nearest=True))
        truth = truth.long().to(device)
        superpixels = torch.from_numpy(np.asarray(provider(view), dtype=np.int64))[None].to(device)
        images = normalize(torch.from_numpy(view).permute(2, 0, 1)[None].to(device).float() / 255)
        with torch.no_grad():
            maps = hierarchy(model.forward_features(images, superpixels, segmentation=True), superpixels)[0]
        clip_image = labeller.prepare(view)
        result = label_and_score(labeller, clip_image, maps[self.coarse_level - 1], maps[self.fine_level - 1],
                                 truth)
        if not self.oracle:
            return result, None
        objects = labeller.vocabulary.object_map(truth)
        return result, label_and_score(labeller, clip_image, objects, truth, truth)

    def run(self, context: WorkerContext) -> dict:
        from cast.superpixels import get_provider

        started = time.perf_counter()
        vocabulary = PartVocabulary.from_classes(read_manifest(self.shards).classes, self.shards)
        model = self.model.build(context.device)
        clip, tokenizer = load_clip(self.clip_model, self.clip_weights, context.device)
        labeller = ClipLabeller(clip, tokenizer, vocabulary, context.device, self.clip_batch)
        provider = get_provider(self.superpixels, **self.superpixel_params)
        loader = self.data.loader(self.shards, context)
        scores: dict[str, list[float]] = {"object_miou": [], "part_miou": []}
        oracle: dict[str, list[float]] = {"object_miou": [], "part_miou": []}
        failed: list[str] = []
        for batch in _limit(loader, self.data.max_batches):
            images = to_device(batch, context.device, with_superpixels=False)["images"][:, 0]
            for image, mask, key in zip(images, batch["mask"], batch["key"]):
                try:
                    result, bound = self._image(model, labeller, provider, image, mask, context.device)
                except Exception as error:  # noqa: BLE001 - counted and named, never swallowed
                    failed.append(f"{key}: {type(error).__name__}: {error}")
                    log.warning("partimagenet: %s failed (%s: %s)", key, type(error).__name__, error)
                    continue
                for name in scores:
                    scores[name].append(result[name])
                    if bound is not None:
                        oracle[name].append(bound[name])
        gathered = context.gather((scores, oracle, failed))
        result: dict = {"model": self.model.name, "checkpoint": self.model.label, "shards": self.shards,
                        "clip_model": self.clip_model, "clip_weights": self.clip_weights or "random (smoke)",
                        "coarse_level": self.coarse_level, "fine_level": self.fine_level,
                        "objects": len(vocabulary.objects), "parts": len(vocabulary.parts)}
        for title, index in (("cast", 0), ("oracle", 1)):
            if title == "oracle" and not self.oracle:
                continue
            for name in ("object_miou", "part_miou"):
                values = [v for worker in gathered for v in worker[index][name]]
                result.setdefault(title, {})[name] = float(np.mean(values)) * 100 if values else float("nan")
        result["images"] = sum(len(worker[0]["object_miou"]) for worker in gathered)
        result["failed_images"] = [f for worker in gathered for f in worker[2]]
        result["failed"] = len(result["failed_images"])
        result["skipped"] = _summed_counts(context, _skip_counts(loader))
        result.update({"workers": context.world_size, "seconds": time.perf_counter() - started})
        return result
