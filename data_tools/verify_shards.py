"""Read every shard back and check it against ``_info.json``: counts per shard, undecodable samples.

Usage: ``python -m data_tools.verify_shards DEST [--write-verified]`` (exit 1 on any mismatch or
damage). ``--write-verified`` records the counts really read in ``_verified.json`` beside
``_info.json``; readers use them instead of the claimed ones from then on (shards that could not be
fetched keep their claim).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from cast.data.samples import LABEL_KEY, MASK_KEY, decode_image, decode_label, decode_mask, image_key
from cast.data.shards import Counters, iter_raw_samples, list_shards, write_verified


@dataclass
class VerifyReport:
    num_shards: int = 0
    expected: int = 0
    found: int = 0
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # shard URL -> samples read (fetched shards only)
    manifest_url: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems and self.found == self.expected


def _check_sample(sample: dict, labelled: bool, num_classes: int = 0) -> str | None:
    """What is wrong with a sample, decoded as the training reader decodes it (``None``: nothing);
    a ``cls`` label must index the manifest's ``classes`` (``num_classes``)."""
    key = image_key(sample)
    if key is None:
        return "no image member"
    if labelled and LABEL_KEY not in sample and MASK_KEY not in sample:  # dense sets: classes name mask ids
        return f"no {LABEL_KEY} member"
    try:
        decode_image(sample[key], f"{sample['__key__']}.{key}")
        if MASK_KEY in sample:
            decode_mask(sample[MASK_KEY], f"{sample['__key__']}.{MASK_KEY}")
        label = decode_label(sample)
    except Exception as error:  # noqa: BLE001 - any decode failure is a finding to report
        return f"undecodable ({type(error).__name__}: {error})"
    if num_classes and LABEL_KEY in sample and not 0 <= label < num_classes:
        return f"label {label} outside 0..{num_classes - 1} (the {num_classes} classes of _info.json)"
    return None


def verify(spec: str) -> VerifyReport:
    shard_set = list_shards(spec)
    report = VerifyReport(num_shards=shard_set.num_shards, expected=shard_set.num_samples,
                          manifest_url=shard_set.url)
    source = shard_set.verified_from.rsplit("/", 1)[-1] or "_info.json"
    labelled = bool(shard_set.classes)
    for shard in shard_set.shards:
        counters = Counters()
        count = 0
        for sample in iter_raw_samples(shard.url, counters):
            count += 1
            problem = _check_sample(sample, labelled, len(shard_set.classes))
            if problem:
                report.problems.append(f"{shard.url}: sample {sample['__key__']}: {problem}")
        for reason in sorted(counters):  # truncated_shard, missing_shard, unreachable_shard
            report.problems.append(f"{shard.url}: {reason} ({'; '.join(counters.messages) or 'no detail'})")
        if count != shard.num_samples:
            report.problems.append(f"{shard.url}: {count} samples, {source} says {shard.num_samples}")
        if not {"missing_shard", "unreachable_shard"} & set(counters):
            report.counts[shard.url] = count
        report.found += count
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.verify_shards", description=__doc__.split("\n")[0]
    )
    parser.add_argument("dest", help="shard folder with _info.json (any fsspec URL) or a brace pattern")
    parser.add_argument("--write-verified", action="store_true",
                        help="record the counts read in _verified.json beside _info.json (readers use them)")
    args = parser.parse_args(argv)
    report = verify(args.dest)
    for problem in report.problems:
        print(problem, file=sys.stderr)
    print(
        f"{report.num_shards} shards, {report.found}/{report.expected} samples, "
        f"{len(report.problems)} problems"
    )
    if args.write_verified:
        if not report.manifest_url:
            # a shard set without a manifest has its counts read from the tars already
            parser.error(f"{args.dest}: no _info.json to record verified counts beside")
        written = write_verified(report.manifest_url, report.counts)
        print(f"verified counts of {len(report.counts)} shards written to {written}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
