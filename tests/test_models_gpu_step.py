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


def test_masked_batch_norm_equals_batch_norm_of_the_valid_rows():
    from torch import nn

    from cast.models.fusion import masked_batch_norm

    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(30, 6, generator=gen) * 3 + 1
    valid = torch.rand(30, generator=gen) > 0.3
    ours, reference = nn.BatchNorm1d(6), nn.BatchNorm1d(6)
    for norm in (ours, reference):
        nn.init.normal_(norm.weight, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # training mode: batch statistics of the valid rows, running stats updated alike
        out = masked_batch_norm(ours, flat, valid)
        expected = torch.zeros_like(flat).index_put((valid,), reference(flat[valid]))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name), rtol=1e-5, atol=1e-6)
    ours.eval(), reference.eval()
    expected = torch.zeros_like(flat).index_put((valid,), reference(flat[valid]))
    torch.testing.assert_close(masked_batch_norm(ours, flat, valid), expected)


def test_fusion_variant_compiles_to_one_graph_with_a_token_budget():
    """Training-mode forward (the masked BatchNorm's path) of a fusion variant; backward: see cast_small."""
    from benchmarks.model import jittered_grid

    torch.manual_seed(0)
    model = timm.create_model("cast_seg_tiny_pretrain", num_tokens=30, pool_dropout=0.0, fusion_dropout=0.0)
    images, superpixels = torch.randn(2, 3, 64, 64), jittered_grid(2, 64, cells=5)  # 25 labels: 5 padded
    with torch.no_grad():
        eager = model(images, superpixels)
        stats = model.fusion.norm.running_mean.clone()
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(images, superpixels)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    assert not torch.equal(model.fusion.norm.running_mean, stats)  # the compiled step updated them too
