"""Read every shard back and check it against ``_info.json``: counts per shard, undecodable samples.

Usage: ``python -m data_tools.verify_shards DEST`` (exit 1 on any mismatch or damage).
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass, field

from PIL import Image

from cast.data.shards import Counters, image_key, iter_raw_samples, list_shards


@dataclass
class VerifyReport:
    num_shards: int = 0
    expected: int = 0
    found: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.found == self.expected


def _check_sample(sample: dict, labelled: bool) -> str | None:
    key = image_key(sample)
    if key is None:
        return "no image member"
    if labelled and "cls" not in sample:
        return "no cls member"
    try:
        for member in (key, "seg.png"):
            if member in sample:
                with Image.open(io.BytesIO(sample[member])) as image:
                    image.load()
        if "cls" in sample:
            int(sample["cls"])
    except Exception as error:  # noqa: BLE001 - any decode failure is a finding to report
        return f"undecodable ({type(error).__name__}: {error})"
    return None


def verify(spec: str) -> VerifyReport:
    shard_list = list_shards(spec)
    report = VerifyReport(num_shards=len(shard_list.shards), expected=shard_list.num_samples)
    labelled = bool(shard_list.classes)
    for shard in shard_list.shards:
        counters = Counters()
        count = 0
        for sample in iter_raw_samples(shard.url, counters):
            count += 1
            problem = _check_sample(sample, labelled)
            if problem:
                report.problems.append(f"{shard.url}: sample {sample['__key__']}: {problem}")
        if counters["truncated_shard"]:
            report.problems.append(f"{shard.url}: truncated or unreadable tar")
        if count != shard.num_samples:
            report.problems.append(f"{shard.url}: {count} samples, _info.json says {shard.num_samples}")
        report.found += count
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.verify_shards", description=__doc__.split("\n")[0]
    )
    parser.add_argument("dest", help="shard folder with _info.json (any fsspec URL) or a brace pattern")
    report = verify(parser.parse_args(argv).dest)
    for problem in report.problems:
        print(problem, file=sys.stderr)
    print(
        f"{report.num_shards} shards, {report.found}/{report.expected} samples, "
        f"{len(report.problems)} problems"
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
