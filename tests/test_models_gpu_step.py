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


def _loss_and_grads(model, forward, images, superpixels):
    out = forward(images, superpixels)
    out.float().square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_cast_small_forward_and_backward_compile_to_one_graph():
    """fullgraph=True fails on any graph break (.item(), nonzero, data-dependent shapes). aot_eager traces
    forward and backward through dynamo and AOTAutograd like inductor does, without its minutes of C++
    codegen on 2 cores; the benchmark (benchmarks.model --compile) runs inductor itself."""
    from benchmarks.model import jittered_grid

    torch.manual_seed(0)
    model = timm.create_model("cast_small", img_size=112, num_tokens=100, pool_dropout=0.0, num_classes=10)
    model.train()
    images, superpixels = torch.randn(2, 3, 112, 112), jittered_grid(2, 112, cells=10)
    eager_out, eager_grads = _loss_and_grads(model, model, images, superpixels)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, grads = _loss_and_grads(model, compiled, images, superpixels)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    assert grads.keys() == eager_grads.keys() and len(grads) > 100
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("pooling", ["nearest", "area"])
def test_token_budget_gives_the_dynamic_outputs_plus_padding(pooling):
    """A fixed budget only adds padded tokens past the largest label: same embedding, logits, seeds."""
    from benchmarks.model import jittered_grid

    torch.manual_seed(0)
    dynamic = timm.create_model("cast_tiny", token_pooling=pooling).eval()
    static = timm.create_model("cast_tiny", token_pooling=pooling, num_tokens=40).eval()
    static.load_state_dict(dynamic.state_dict())
    images, superpixels = torch.randn(2, 3, 64, 64), jittered_grid(2, 64, cells=5)  # 25 labels
    with torch.no_grad():
        a = dynamic.forward_features(images, superpixels, segmentation=True)
        b = static.forward_features(images, superpixels, segmentation=True)
    assert b.tokens[0].shape[1] == 40 and b.padding_masks[0][:, 25:].all()
    torch.testing.assert_close(b.embedding, a.embedding, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.logits[0][:, :25], a.logits[0], rtol=1e-4, atol=1e-4)
    assert all(torch.equal(x, y) for x, y in zip(a.seeds, b.seeds))
    with pytest.raises(ValueError, match="num_tokens"):
        timm.create_model("cast_tiny", num_tokens=8)
