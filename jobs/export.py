"""Export a checkpoint of ours in the original CAST code's layout, for its tools and loaders.

    python -m jobs.export --checkpoint s3://b/runs/deit/best --layout deit --out best_checkpoint.pth \\
        --weights ema
    python -m jobs.export --checkpoint s3://b/runs/moco --layout moco --out checkpoint_0099.pth.tar

``--checkpoint`` is a checkpoint folder (``<run>/best``, ``checkpoint_*``) or a run folder (its newest
complete checkpoint). ``deit`` writes ``{'model', 'model_ema', 'epoch', 'arch'}`` (DeiT's
``best_checkpoint.pth``) of a supervised run: ``model`` holds the raw or the EMA weights (``--weights``),
``model_ema`` the EMA when the run kept one. ``moco`` writes ``{'state_dict', 'epoch', 'arch'}`` (MoCo-v3's
``checkpoint_XXXX.pth.tar``) of a MoCo run. The model is rebuilt from the checkpoint's ``config.yaml`` to
know its structure; the key map is ``cast.models.original_checkpoint.KEY_TABLE``.
"""

from __future__ import annotations

import argparse
import io
import sys

import fsspec
import torch

from cast.artifacts import CONFIG_FILE, latest_checkpoint, read_state
from cast.config import load_config
from cast.models.original_checkpoint import EXPORT_LAYOUTS, backbone_to_original, to_original_checkpoint
from cast.storage import join
from cast.train.config import TrainConfig
from cast.train.objectives import build_objective


def export_checkpoint(checkpoint: str, layout: str, weights: str = "raw") -> dict:
    """The original-layout dict of ``checkpoint`` (our checkpoint or run folder). ValueError naming the
    checkpoint when it has no EMA weights for ``weights='ema'`` or does not fit ``layout``."""
    fs, path = fsspec.core.url_to_fs(checkpoint)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint or run folder")
    folder = latest_checkpoint(checkpoint)
    state = read_state(folder)
    cfg = load_config(TrainConfig, join(folder, CONFIG_FILE))
    if cfg.objective not in ("supervised", "moco"):
        raise ValueError(f"{folder}: a {cfg.objective} run; the original layouts export supervised (deit) "
                         "and moco runs")
    if weights == "ema":
        if "ema" not in state:
            raise ValueError(f"{folder}: holds no EMA weights (trained with supervised.ema_decay=0?); "
                             "export --weights raw")
        weights_state = state["ema"]
    elif weights == "raw":
        weights_state = state["model"]
    else:
        raise ValueError(f"--weights: {weights!r} is not raw or ema")
    with torch.device("meta"):  # the structure only (stages, fusion, positions): no memory, no init
        module = build_objective(cfg).build()
    encoder = getattr(module, "base_encoder", module)  # a MoCo module: its encoder
    meta = {"epoch": state.get("position", {}).get("epoch", 0), "arch": cfg.model.name}
    try:
        if layout == "deit" and "ema" in state:  # DeiT keeps its EMA beside the model, as model_ema
            meta["model_ema"] = backbone_to_original(state["ema"], encoder)
        return to_original_checkpoint(weights_state, encoder, layout, **meta)
    except ValueError as error:
        raise ValueError(f"{folder} ({cfg.objective} run of {cfg.model.name}): {error}") from error


def save(checkpoint: dict, url: str) -> str:
    """``torch.save`` to a path or any fsspec URL (written whole, after serialising)."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with fsspec.open(url, "wb") as f:
        f.write(buffer.getvalue())
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="our checkpoint folder or run folder")
    parser.add_argument("--layout", required=True, choices=EXPORT_LAYOUTS)
    parser.add_argument("--out", required=True, help="file to write (path or fsspec URL)")
    parser.add_argument("--weights", choices=("raw", "ema"), default="raw",
                        help="the trained weights or the model EMA of a supervised run (default raw)")
    args = parser.parse_args(argv)
    try:
        exported = export_checkpoint(args.checkpoint, args.layout, args.weights)
    except (ValueError, FileNotFoundError) as error:
        print(f"jobs.export: {error}", file=sys.stderr)
        return 2
    state = exported.get("model", exported.get("state_dict"))
    print(f"wrote {save(exported, args.out)}: layout {args.layout}, {len(state)} tensors, "
          f"{args.weights} weights of epoch {exported['epoch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
