"""CAST encoder behaviour: shapes, segments, gradients, padding and batch independence, timm API."""

import pytest
import timm
import timm.optim
import torch

import cast.models as cm


def grid_superpixels(batch: int, size: int, cell: int = 8, seed: int = 0) -> torch.Tensor:
    """Regular cell x cell superpixels with jittered borders (labels 0..(size/cell)^2-1 per image)."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    maps = []
    for _ in range(batch):
        dy = torch.randint(-2, 3, (size, 1), generator=gen)
        dx = torch.randint(-2, 3, (1, size), generator=gen)
        rows = (yy + dy).clamp(0, size - 1) // cell
        cols = (xx + dx).clamp(0, size - 1) // cell
        maps.append(rows * (size // cell) + cols)
    return torch.stack(maps).long()


def backbone_params(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("head."))


@pytest.mark.parametrize("name", sorted(n for n in cm.PRESETS if "base" not in n))
def test_every_variant_builds_and_runs_at_small_size(name):
    # the base variants differ from the small ones only in width; their structure is checked on the meta
    # device below, which keeps this file inside its CPU budget
    model = timm.create_model(name, img_size=64, num_clusters=(16, 8, 4, 2)).eval()
    images, superpixels = torch.randn(2, 3, 64, 64), grid_superpixels(2, 64)
    with torch.no_grad():
        out = model.forward_features(images, superpixels, segmentation=True)
        logits = model.head(out.dense_tokens if model.config.task == "dense" else out.embedding)
    dim, task = model.embed_dim, model.config.task
    assert out.embedding.shape == (2, dim) and out.cls.shape == (2, dim)
    assert [t.shape[1] for t in out.tokens] == [64, 16, 8, 4]
    assert [lg.shape[1:] for lg in out.logits] == [(64, 16), (16, 8), (8, 4), (4, 2)]
    assert [s.shape for s in out.seeds] == [(2, 16), (2, 8), (2, 4), (2, 2)]
    assert [m.shape for m in out.padding_masks] == [(2, n) for n in (64, 16, 8, 4)]
    if task == "classification":
        assert out.dense_tokens is None and logits.shape == (2, 1000)
    else:
        assert out.dense_tokens.shape == (2, 64, dim)
        assert logits.shape == ((2, 64, dim) if task == "dense" else (2, 1000))


def test_preset_architectures_follow_the_reference():
    small, deep = cm.cast_config("cast_small"), cm.cast_config("cast_base_deep_deit")
    assert (small.embed_dim, small.depths, small.num_clusters, small.num_heads) == (
        384,
        (3, 3, 3, 2),
        (64, 32, 16, 8),
        12,
    )
    assert (deep.embed_dim, deep.depths, deep.pos_embed, deep.drop_path_rate) == (
        768,
        (6, 3, 3, 3),
        "learned",
        0.1,
    )
    dense = cm.cast_config("cast_seg_small")
    assert dense.num_clusters == (320, 160, 80, 40) and dense.task == "dense"
    assert cm.cast_config("cast_seg_small_pretrain").num_clusters == (64, 32, 16, 8)
    assert small.logit_scale == 5.0 and small.pool_dropout == 0.1 and dense.fusion_dropout == 0.2


@pytest.mark.parametrize("name", sorted(cm.PRESETS))
def test_parameter_counts_follow_the_reference_arithmetic(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    config, dim = model.config, model.embed_dim
    widths = [3, dim // 8, dim // 4, dim // 2, dim]
    stem = sum(9 * a * b + 2 * b for a, b in zip(widths, widths[1:])) + dim * dim + dim
    assert stem == {192: 256_152, 384: 1_021_488, 768: 4_079_712}[dim]  # cast_reference.md 1.3
    expected = stem + sum(config.depths) * (12 * dim**2 + 13 * dim) + 4 * (12 * dim**2 + 22 * dim) + dim
    expected += (4 * dim**2 + 9 * dim) if config.task != "classification" else 2 * dim  # fusion / final LN
    if config.pos_embed == "learned":
        expected += (1 + (config.img_size // 8) ** 2) * dim
    assert backbone_params(model) == expected


def test_backbone_parameter_counts_match_reference_table():
    # cast_reference.md 1.3: backbone without head and fixed positions
    assert backbone_params(cm.create_model("cast_small")) == pytest.approx(27.65e6, rel=0.01)
    with torch.device("meta"):
        assert backbone_params(cm.create_model("cast_base")) == pytest.approx(110.43e6, rel=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_level_has_exactly_k_segments(dtype):
    model = cm.create_model("cast_tiny").eval()
    superpixels = grid_superpixels(3, 64, seed=5)
    superpixels[1] = superpixels[1] * 2  # gaps: padded tokens inside the label range
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = model.forward_features(torch.randn(3, 3, 64, 64), superpixels, segmentation=True)
    assert out.logits[0].dtype == torch.float32
    levels = cm.hierarchy(out, superpixels)
    assert levels.shape == (3, 4, 64, 64) and levels.dtype == torch.int64
    for b in range(3):
        assert [levels[b, lv].unique().numel() for lv in range(4)] == [16, 8, 4, 2]
        for coarse in range(1, 4):  # each coarse segment is a union of finer ones
            pairs = torch.stack([levels[b, coarse - 1].flatten(), levels[b, coarse].flatten()]).unique(dim=1)
            assert pairs.shape[1] == levels[b, coarse - 1].unique().numel()


@pytest.mark.parametrize("name", ["cast_tiny", "cast_seg_tiny", "cast_seg_tiny_pretrain"])
def test_gradients_reach_every_trainable_parameter(name):
    torch.manual_seed(0)  # drop path off: with 2 images it can drop a whole branch for both
    model = cm.create_model(name, pos_embed="learned").train()
    out = model(torch.randn(2, 3, 64, 64), grid_superpixels(2, 64, seed=1))
    out.float().square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    no_grad = sorted(
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    )
    assert not no_grad, f"no gradient for {no_grad}"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("pools.3.") for n in frozen) and trainable


def test_outputs_ignore_batch_companions_and_extra_padded_labels():
    model = cm.create_model("cast_tiny").eval()
    images = torch.randn(3, 3, 64, 64)
    superpixels = grid_superpixels(3, 64, cell=8, seed=2)
    superpixels[1] = grid_superpixels(1, 64, cell=4, seed=3)[0]  # 256 labels: pads image 0 in a batch
    with torch.no_grad():
        alone = model.forward_features(images[:1], superpixels[:1], segmentation=True)
        batched = model.forward_features(images, superpixels, segmentation=True)
        relabelled = superpixels[:1] * 3 + 1  # same segments, labels spread out with gaps
        spread = model.forward_features(images[:1], relabelled, segmentation=True)
    torch.testing.assert_close(batched.embedding[:1], alone.embedding, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(spread.embedding, alone.embedding, rtol=1e-4, atol=1e-5)
    assert batched.padding_masks[0][0, 64:].all() and alone.padding_masks[0].shape == (1, 64)
    for level in range(4):
        assert torch.equal(cm.hierarchy(batched, superpixels)[:1], cm.hierarchy(alone, superpixels[:1]))
        assert torch.equal(cm.hierarchy(spread, relabelled), cm.hierarchy(alone, superpixels[:1]))
        torch.testing.assert_close(
            batched.logits[level][:1, : alone.logits[level].shape[1]],
            alone.logits[level],
            rtol=1e-4,
            atol=1e-4,
        )


def test_dense_outputs_ignore_padding_and_area_pooling_keeps_every_superpixel():
    model = cm.create_model("cast_seg_tiny").eval()
    assert model.config.resolved_token_pooling == "area"
    superpixels = grid_superpixels(2, 64, seed=4)
    superpixels[1] = superpixels[1] * 2
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        both = model.forward_features(images, superpixels)
        alone = model.forward_features(images[1:], superpixels[1:] // 2)
    assert not both.padding_masks[0][0, :64].any() and both.padding_masks[0][0, 64:].all()
    torch.testing.assert_close(both.dense_tokens[1, ::2], alone.dense_tokens[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both.embedding[1], alone.embedding[0], rtol=1e-4, atol=1e-5)
    pixels = cm.paint_superpixels(both.dense_tokens, superpixels)
    assert pixels.shape == (2, 64, 64, 192)
    torch.testing.assert_close(pixels[1, 5, 7], both.dense_tokens[1, superpixels[1, 5, 7]])


def test_compat_and_default_agree_without_padding():
    default = cm.create_model("cast_seg_tiny_pretrain").eval()
    compat = cm.create_model("cast_seg_tiny_pretrain", compat=True).eval()
    compat.load_state_dict(default.state_dict())
    images = torch.randn(2, 3, 64, 64)
    superpixels = (
        torch.arange(64).view(1, 8, 8).repeat_interleave(8, 1).repeat_interleave(8, 2).repeat(2, 1, 1)
    )
    with torch.no_grad():
        a, b = default.forward_features(images, superpixels), compat.forward_features(images, superpixels)
    assert len(a.logits) == 3 and len(b.logits) == 4  # the last pooling only runs when asked for
    torch.testing.assert_close(a.embedding, b.embedding, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(a.seeds, b.seeds))


def test_timm_api_and_bad_inputs():
    model = timm.create_model("cast_tiny", num_classes=10)
    assert model.embed_dim == 192 and model.head.out_features == 10
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 64, 64)
    groups = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.cls_token) in no_decay and id(model.blocks[0].attn.qkv.weight) not in no_decay
    model.reset_classifier(0)
    images, superpixels = torch.randn(1, 3, 64, 64), grid_superpixels(1, 64)
    assert model(images, superpixels).shape == (1, 192)
    with pytest.raises(TypeError, match="unknown option"):
        timm.create_model("cast_tiny", depth=3)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 60, 60), superpixels[:, :60, :60])
    with pytest.raises(ValueError, match="superpixel tokens"):
        model(images, torch.zeros(1, 64, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(images, superpixels.float())
    with pytest.raises(ValueError, match="same length"):
        cm.CASTConfig(depths=(1, 1), num_clusters=(4,))


@pytest.mark.parametrize("task", ["classification", "dense"])
def test_stage_count_is_configuration(task):
    config = cm.CASTConfig(
        embed_dim=64,
        depths=(1, 2, 1, 1, 1),
        num_clusters=(16, 12, 6, 3, 2),
        num_heads=2,
        img_size=48,
        task=task,
        num_classes=5,
    )
    model = cm.CAST(config).eval()
    superpixels = grid_superpixels(2, 48, cell=8)
    with torch.no_grad():
        out = model.forward_features(torch.randn(2, 3, 48, 48), superpixels, segmentation=True)
    levels = cm.hierarchy(out, superpixels)
    assert [levels[0, lv].unique().numel() for lv in range(5)] == [16, 12, 6, 3, 2]
    assert len(model.blocks) == 6 and len(model.pools) == 5
