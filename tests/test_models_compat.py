"""Compat mode against a literal, independent re-statement of the original CAST forward pass.

``original_forward`` below follows twke18/CAST (cast.py, cast_seg.py, graph_pool.py, modules.py, utils.py)
step by step in plain torch, reading weights under the original key names: batch-wide label count,
scatter_add segment means, no attention masks, padded tokens in every mean, float64 FPS from the
prepended mean token, the frozen pool4 always run. Random weights, eval mode.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cast.models as cm
from tests.test_models_checkpoint import original_backbone, randomise


def segment_mean_nd(x, index):
    """utils.segment_mean_nd for a [N, H, W, C] input: labels offset by the batch-wide max."""
    n, c = x.shape[0], x.shape[-1]
    index = index.flatten(1)
    x = x.flatten(1, 2)
    max_ind = index.max() + 1
    index = (torch.arange(n)[:, None] * max_ind + index).reshape(-1)
    x = x.reshape(-1, c)
    size = int(index.max()) + 1
    num = torch.zeros(size).scatter_add_(0, index, torch.ones(index.shape[0]))
    num = torch.where(num == 0, torch.ones_like(num), num)
    total = torch.zeros(size, c).scatter_add_(0, index[:, None].expand(-1, c), x)
    mean = total / num[:, None]
    expected = n * int(max_ind)
    if mean.shape[0] < expected:
        mean = F.pad(mean, (0, 0, 0, expected - mean.shape[0]))
    return mean.view(n, int(max_ind), c)


def dgl_fps(points: np.ndarray, npoints: int, start: int) -> list[int]:
    """dgl's CPU farthest_point_sampler for one cloud: running min distance, strict '>' argmax."""
    dist = np.full(points.shape[0], 1e10)
    picked = [start]
    for _ in range(npoints - 1):
        d = ((points - points[picked[-1]]) ** 2).sum(1)
        dist = np.minimum(dist, d)
        picked.append(int(np.argmax(dist)))
    return picked


def ln(x, p, name, eps):
    return F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"], eps)


def attention(x, p, name, heads):
    b, n, c = x.shape
    qkv = F.linear(x, p[name + ".qkv.weight"], p[name + ".qkv.bias"])
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    return F.linear(
        (attn @ v).transpose(1, 2).reshape(b, n, c), p[name + ".proj.weight"], p[name + ".proj.bias"]
    )


def vit_block(x, p, name, heads):
    x = x + attention(ln(x, p, name + ".norm1", 1e-6), p, name + ".attn", heads)
    h = F.gelu(
        F.linear(ln(x, p, name + ".norm2", 1e-6), p[name + ".mlp.fc1.weight"], p[name + ".mlp.fc1.bias"])
    )
    return x + F.linear(h, p[name + ".mlp.fc2.weight"], p[name + ".mlp.fc2.bias"])


def graph_pooling(p, name, cls, src, mask, k, heads):
    bs, sl, cs = src.shape
    valid = (~mask).float().unsqueeze(2)
    mean = (src * valid).sum(1) / valid.sum(1).clamp(min=1)
    filled = torch.where(mask.unsqueeze(2).expand(-1, -1, cs), mean[:, None].expand(-1, sl, -1), src)
    padded = torch.cat([mean[:, None], filled], dim=1).double().numpy()
    inds = torch.tensor([dgl_fps(padded[b], k + 1, 0) for b in range(bs)])[:, 1:] - 1
    assert (inds >= 0).all()
    unfold = inds.unsqueeze(2).expand(-1, -1, cs)
    node = src + attention(ln(src, p, name + ".centroid_fc.norm", 1e-6), p, name + ".centroid_fc.attn", heads)
    node = node - node.mean(dim=1, keepdim=True) + p[name + ".centroid_fc.bias"].view(1, 1, -1)
    centroid = torch.gather(node, 1, unfold)
    logits = torch.einsum(
        "bij,bjk->bik", F.normalize(node, dim=-1), F.normalize(centroid, dim=-1).transpose(1, 2)
    )
    logits = logits * 5
    assign = logits.softmax(dim=-1)
    fc1 = ln(torch.cat([cls, src], dim=1), p, name + ".fc1.0", 1e-5)
    fc1 = F.gelu(F.linear(fc1, p[name + ".fc1.1.weight"], p[name + ".fc1.1.bias"]))
    normalizer = torch.einsum("bij,bjk->bik", assign.transpose(1, 2), torch.ones(bs, sl, 1))
    cents = torch.einsum("bij,bjk->bik", assign.transpose(1, 2), fc1[:, 1:]) / normalizer
    fc2 = ln(torch.cat([fc1[:, :1], cents], dim=1), p, name + ".fc2.0", 1e-5)
    fc2 = F.linear(fc2, p[name + ".fc2.1.weight"], p[name + ".fc2.1.bias"])
    return fc2[:, :1] + cls, fc2[:, 1:] + torch.gather(src, 1, unfold), logits, inds


def conv_stem(p, x):
    for i in range(4):
        stride = 2 if i < 3 else 1
        x = F.conv2d(x, p[f"patch_embed.proj.{3 * i}.weight"], stride=stride, padding=1)
        bn = f"patch_embed.proj.{3 * i + 1}"
        x = F.batch_norm(
            x,
            p[bn + ".running_mean"],
            p[bn + ".running_var"],
            p[bn + ".weight"],
            p[bn + ".bias"],
            False,
            0.0,
            1e-5,
        )
        x = F.relu(x)
    x = F.conv2d(x, p["patch_embed.proj.12.weight"], p["patch_embed.proj.12.bias"])
    return x.permute(0, 2, 3, 1)


def original_forward(p, config, x, y, stage):
    """stage: 'cls' (cast.py / cast_deit.py), 'pretrain' or 'segmentation' (cast_seg.py)."""
    heads, clusters = config.num_heads, config.num_clusters
    x = conv_stem(p, x)
    n, h, w, c = x.shape
    learned = "pe_token" not in p
    table = p["pos_embed"][:, 1:] if learned else p["pos_embed"]
    if stage != "segmentation":
        y = F.interpolate(y.unsqueeze(1).float(), (h, w), mode="nearest").squeeze(1).long()
    yh, yw = y.shape[-2:]
    if stage == "segmentation":
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(yh, yw), mode="bilinear").permute(0, 2, 3, 1)
        pos = (
            F.interpolate(
                table.view(1, h, w, c).permute(0, 3, 1, 2), size=(yh, yw), mode="bicubic", align_corners=False
            )
            .permute(0, 2, 3, 1)
            .contiguous()
        )
    else:
        pos = table.view(1, h, w, c)
    x = segment_mean_nd(x, y)
    padding = segment_mean_nd(torch.ones(n, yh, yw, 1), y).squeeze(-1) <= 0.5
    x = x + segment_mean_nd(pos.expand(n, -1, -1, -1), y)
    cls = p["cls_token"].expand(n, -1, -1) + (p["pos_embed"][:, :1] if learned else p["pe_token"])
    out = {"padding": padding, "blocks": [], "logits": [], "seeds": [], "cls": []}
    block_index = 0
    mask = padding
    for s, depth in enumerate(config.depths):
        cls_x = torch.cat([cls, x], dim=1)
        for _ in range(depth):  # read the sliced aliases blocks{s}.{i}
            cls_x = vit_block(cls_x, p, f"blocks{s + 1}.{block_index}", heads)
            block_index += 1
        cls, x = cls_x[:, :1], cls_x[:, 1:]
        out["blocks"].append(x)
        cls, x, logit, inds = graph_pooling(p, f"pool{s + 1}.pool_block", cls, x, mask, clusters[s], heads)
        out["logits"].append(logit)
        out["seeds"].append(inds)
        out["cls"].append(cls)
        mask = torch.zeros(n, clusters[s], dtype=torch.bool)
    if stage == "cls":
        out["embedding"] = ln(cls_x, p, "norm", 1e-6)[:, 0]
        return out
    labels = [out["logits"][0].argmax(-1)]
    for logit in out["logits"][1:3]:
        labels.append(torch.gather(logit.argmax(-1), 1, labels[-1]))
    unpooled = [out["blocks"][0]] + [
        torch.gather(b, 1, lab.unsqueeze(2).expand(-1, -1, c)) for b, lab in zip(out["blocks"][1:], labels)
    ]
    rows = torch.cat([torch.cat(out["cls"], dim=-1), torch.cat(unpooled, dim=-1)], dim=1)
    bn = "block_fusion.proj_blocks.0.norm"
    rows = F.batch_norm(
        rows.transpose(1, 2),
        p[bn + ".running_mean"],
        p[bn + ".running_var"],
        p[bn + ".weight"],
        p[bn + ".bias"],
        False,
        0.0,
        1e-5,
    ).transpose(1, 2)
    rows = F.linear(rows, p["block_fusion.proj_blocks.2.weight"], p["block_fusion.proj_blocks.2.bias"])
    out["dense"], out["fused_cls"] = rows[:, 1:], rows[:, 0]
    out["embedding"] = out["dense"].mean(dim=1)
    return out


def ragged_superpixels(size: int) -> torch.Tensor:
    """Two images with different label counts (batch-wide padding for the second) and thin superpixels
    that nearest snapping loses (padded tokens inside the first)."""
    gen = torch.Generator().manual_seed(7)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    first = ((yy // 8) * (size // 8) + xx // 8) * 2  # one superpixel per grid cell, even labels
    first[3::8, :] = first[3::8, :] + 1  # thin stripes with odd labels: never on a top-left pixel
    first[first >= 10] += 1  # label 10 is absent altogether
    second = (yy // 8) * (size // 8) + (xx // 16) * 2 + torch.randint(0, 2, (size, size), generator=gen)
    return torch.stack([first, second]).long()


@pytest.mark.parametrize(
    "name,overrides,stage",
    [
        ("cast_tiny", {}, "cls"),
        ("cast_tiny", {"pos_embed": "learned"}, "cls"),
        ("cast_seg_tiny_pretrain", {}, "pretrain"),
        ("cast_seg_tiny", {}, "segmentation"),
        ("cast_seg_tiny", {"pos_embed": "learned"}, "segmentation"),
    ],
)
def test_compat_matches_literal_original(name, overrides, stage):
    torch.manual_seed(0)
    model = randomise(cm.create_model(name, compat=True, **overrides), seed=11).eval()
    p = original_backbone(model)
    images = torch.randn(2, 3, 64, 64)
    superpixels = ragged_superpixels(64)
    with torch.no_grad():
        ours = model.forward_features(images, superpixels)
        ref = original_forward(p, model.config, images, superpixels, stage)
    assert ref["padding"].any(dim=1).all(), "both images must have padded tokens"
    torch.testing.assert_close(ours.padding_masks[0], ref["padding"])
    assert len(ours.logits) == len(ref["logits"]) == 4
    for level in range(4):
        assert torch.equal(ours.seeds[level], ref["seeds"][level]), f"seeds differ at level {level}"
        torch.testing.assert_close(ours.tokens[level], ref["blocks"][level], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.logits[level], ref["logits"][level], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.embedding, ref["embedding"], rtol=1e-4, atol=1e-4)
    if stage != "cls":
        torch.testing.assert_close(ours.dense_tokens, ref["dense"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.cls, ref["fused_cls"], rtol=1e-4, atol=1e-4)
    if stage == "segmentation":  # every label has pixels, so the hierarchy covers the full map
        levels = cm.hierarchy(ours, superpixels)
        chain = [ref["logits"][0].argmax(-1)]
        for logit in ref["logits"][1:]:
            chain.append(torch.gather(logit.argmax(-1), 1, chain[-1]))
        for level, lab in enumerate(chain):
            expected = torch.stack([lab[b][superpixels[b]] for b in range(2)])
            assert torch.equal(levels[:, level], expected)
