"""Elastic training on a two-node loopback Ray cluster, through `ray job submit`: a MoCo run on
``ray.num_workers=[1, 2]`` loses a node mid-epoch (a spot preemption in miniature: the node's processes
stopped by pid), continues on one worker, grows back to two when the node returns, and every epoch still
trains on each sample exactly once, with the lr of the schedule at the samples seen at every step."""

import json
import os
import re
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from cast.config import load_config
from cast.local_ray import local_ray_head, start_ray_node, stop_process_group, wait_for_nodes
from cast.train.config import TrainConfig
from cast.train.optim import lr_at, scaled_lr
from data_tools.make_shards import build_shards
from tests.fixtures.datasets import make_imagefolder
from tests.fixtures.ray import finished_job_logs, submit_job

REPO = Path(__file__).resolve().parents[1]
TINY = "jobs/configs/moco_cast_tiny.yaml"
# a lost node is declared dead after ~1.5 s of missed health checks instead of Ray's ~15 s
FAST_HEALTH = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
               "RAY_health_check_failure_threshold": "3"}


def _logs(client, job_id: str) -> str:
    return client.get_job_logs(job_id)


def _final_steps(records: list[dict]) -> dict[int, list[dict]]:
    """Per step, the records of the last worker group that trained it (a restarted group replays the
    steps after its checkpoint); ``started`` is rank 0's start time, shared by the group's ranks."""
    by_step: dict[int, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_step[record["step"]][record["started"]].append(record)
    return {step: groups[max(groups)] for step, groups in by_step.items()}


@pytest.fixture
def two_nodes(monkeypatch):
    """A head with 1 CPU and a second node with 1 CPU, both on 127.0.0.1; yields (head, restart, kill)."""
    for key, value in FAST_HEALTH.items():
        monkeypatch.setenv(key, value)
    with local_ray_head(num_cpus=1) as head:
        nodes = [start_ray_node(head)]
        try:
            wait_for_nodes(head, 2)
            yield head, nodes
        finally:
            for node in nodes:
                stop_process_group(node)


@pytest.mark.ray
def test_preempted_node_shrinks_the_group_and_its_return_grows_it_back(two_nodes, tmp_path):
    from ray.job_submission import JobStatus

    head, nodes = two_nodes
    make_imagefolder(tmp_path / "src", num_classes=2, per_class=24, size=64)
    build_shards(str(tmp_path / "src"), str(tmp_path / "shards"), "imagefolder", max_count=8, progress=False)
    samples = tmp_path / "samples"
    overrides = [
        f"data.shards={tmp_path / 'shards'}",
        "data.batch_size=4",  # the memory bound: 4 per worker, so one worker accumulates 2 micro-batches
        "optim.global_batch=8",
        "optim.base_lr=0.05",
        "ray.num_workers=[1, 2]",
        "ray.max_failures=-1",
        "ray.resize_interval_s=2",
        f"ray.storage_path={tmp_path / 'runs'}",
        "ray.name=elastic",
        "schedule.epochs=3",
        "schedule.warmup_epochs=0.5",
        "checkpoint.every_steps=2",
        "logging.every_steps=1",
        "logging.tensorboard=false",
        f"logging.sample_log={samples}",
    ]
    job_id = submit_job(head, ["python", "-m", "jobs.pretrain", "--config", TINY, *overrides], {})
    client = head.client()

    def wait_for(pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = _logs(client, job_id)
            if re.search(pattern, logs):
                return logs
            status = client.get_job_status(job_id)
            assert status not in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED), logs[-4000:]
            time.sleep(0.5)
        raise AssertionError(f"{pattern!r} not in the job's logs after {timeout}s:\n{logs[-4000:]}")

    # a checkpoint mid-epoch 0 on two workers, then the second node goes (all its processes, by pid)
    wait_for(r"\[cast-train\] epoch 0\.\d+ \| step [2-4] .*\| checkpoint ", 120)
    os.killpg(nodes[0].pid, signal.SIGKILL)
    nodes[0].wait()
    wait_for(r"resumed at step \d+ .* on 1 workers: 4 x 2 per step", 90)
    nodes.append(start_ray_node(head))  # the node comes back: the group grows to two again
    wait_for(r"resumed at step \d+ .* on 2 workers: 4 x 1 per step", 90)
    logs = finished_job_logs(head, job_id, timeout=120)
    sizes = [int(w) for w in re.findall(r"resumed at step \d+ .* on (\d) workers", logs)]
    assert sizes[:1] == [1] and 2 in sizes, sizes

    lines = [line for path in samples.glob("rank*.jsonl") for line in path.read_text().split("\n") if line]
    records = [json.loads(line) for line in lines]
    steps = _final_steps(records)
    assert sorted(steps) == list(range(18))  # 48 images / 8 per step x 3 epochs
    assert {len(group) for group in steps.values()} == {1, 2}  # steps trained on one worker and on two
    every = sorted(f"{p.parent.name}/{p.stem}" for p in (tmp_path / "src").rglob("*.jpg"))
    cfg = load_config(TrainConfig, str(REPO / TINY), overrides)
    peak = scaled_lr(cfg.optim, 8)
    for epoch in range(3):
        keys = Counter(key for step in range(6 * epoch, 6 * epoch + 6) for r in steps[step]
                       for key in r["keys"])
        assert sorted(keys.elements()) == every, f"epoch {epoch}: {keys.most_common(3)}"  # each exactly once
    for step, group in steps.items():
        assert {r["samples_seen"] for r in group} == {8 * step}
        expected = lr_at(8 * step, 8 * 18, 24, peak, cfg.schedule)
        assert all(r["lr"] == pytest.approx(expected, rel=1e-9) for r in group), (step, group[0]["lr"])

    # 18 steps keep the contrastive loss near chance (0.8 ln 8 on two workers; 0.8 ln 4 on one, whose
    # micro-batches have 4 keys each): finite on every step is what this run can show; the loss going
    # down is the killed-worker job's (tests/test_jobs.py, 32 steps)
    losses = [float(v) for v in re.findall(r"\| step \d+ \| loss ([0-9.]+)", logs)]
    assert len(losses) >= 18 and all(0 < loss < 3 for loss in losses), losses
