"""The GPU-ready step on CPU: precision-safe seeds and assignments, a static, compilable forward."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import cast.models  # noqa: F401  (registers cast_*)
from cast.data.transforms import views_to_input
from cast.models.fps import sample_seeds
from cast.superpixels import get_provider


@pytest.fixture(scope="module")
def photos():
    """Three scikit-image photos at 224 with their seeds_fast maps (uint8 views, int64 labels)."""
    import skimage.data

    views = np.stack([
        np.asarray(Image.fromarray(np.asarray(getattr(skimage.data, name)())[..., :3]).resize((224, 224)))
        for name in ("astronaut", "chelsea", "coffee")
    ])
    provider = get_provider("seeds_fast")
    maps = torch.stack([torch.from_numpy(np.asarray(provider(v), dtype=np.int64)) for v in views])
    return views, maps


def test_bf16_autocast_picks_the_float32_seeds_on_photos(photos):
    views, maps = photos
    torch.manual_seed(0)
    model = timm.create_model("cast_small", num_classes=0).eval()
    with torch.no_grad():
        out = model.forward_features(views_to_input(views), maps)
    for level, tokens in enumerate(out.tokens[:-1]):
        clusters = model.config.num_clusters[level]
        reference = sample_seeds(tokens, out.padding_masks[level], clusters)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = sample_seeds(tokens, out.padding_masks[level], clusters)
            logits = model.pools[level](out.cls[:, None], tokens, out.padding_masks[level]).logits
        assert torch.equal(under_autocast, reference), f"level {level}: bf16 autocast changed the FPS seeds"
        assert logits.dtype == torch.float32
