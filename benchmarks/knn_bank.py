"""kNN memory bank at scale: time and memory of the blocked top-k (``cast.eval.knn``) on a scaled-down bank,
extrapolated to ImageNet (1.28M x 384 floats), beside the unblocked baseline (one [Q, N] similarity matrix).

Both scale linearly in the bank size N for a fixed query count: the bank is N x D float32 (held once, on
the scoring device) and a query block costs Q x N x D multiply-adds; the blocked search's extra memory is
one ``query_block x bank_block`` tile, the baseline's a whole ``Q x N`` matrix.

    python -m benchmarks.knn_bank --bank 200000 --queries 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from cast.eval.knn import BANK_BLOCK, QUERY_BLOCK, knn_scores

IMAGENET = 1_281_167


def _run(bank, labels, queries, **blocks) -> float:
    started = time.perf_counter()
    knn_scores(bank, labels, queries, 1000, k=20, normalised=True, **blocks)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(args.bank, args.dim, generator=generator), dim=1)
    bank = bank.to(args.device)
    labels = torch.randint(0, 1000, (args.bank,), generator=generator).to(args.device)
    queries = torch.randn(args.queries, args.dim, generator=generator).to(args.device)
    _run(bank, labels, queries[:64])  # warm-up
    blocked = _run(bank, labels, queries)
    baseline = _run(bank, labels, queries, query_block=args.queries, bank_block=args.bank)
    per_million = 1e6 / args.bank
    tile = QUERY_BLOCK * BANK_BLOCK * 4
    result = {
        "device": args.device, "bank": args.bank, "queries": args.queries, "dim": args.dim,
        "blocked_s": blocked, "unblocked_s": baseline, "blocked_vs_unblocked": blocked / baseline,
        "bank_gb_per_million": args.dim * 4 * 1e6 / 1e9,
        "blocked_tile_gb": tile / 1e9,
        "unblocked_matrix_gb_per_million": args.queries * 4 * 1e6 / 1e9,
        "ms_per_query_per_million": blocked / args.queries * per_million * 1e3,
        "imagenet_bank_gb": args.dim * 4 * IMAGENET / 1e9,
        "imagenet_50k_val_s": blocked / args.queries * 50_000 * IMAGENET / args.bank,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
