"""The job entry points as users run them: bad configs stop before Ray; `ray job submit` of a tiny
MoCo run on shards in the loopback S3 server, 2 workers, checkpoints in s3://, one worker killed
mid-run (by pid), and the run finishing from its last checkpoint; a sweep whose driver is killed (by
pid) mid-sweep, submitted again, restored and finished."""

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3

from data_tools.make_shards import build_shards
from tests.fixtures.datasets import make_imagefolder, tiny_sweep_overrides
from tests.fixtures.ray import finished_job_logs, submit_job

REPO = Path(__file__).resolve().parents[1]
TINY = "jobs/configs/moco_cast_tiny.yaml"


def test_bad_config_fails_before_ray(tmp_path):
    """Exit code 2 and the key named; RAY_ADDRESS points nowhere, so any Ray contact would hang or fail."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    for overrides, key in (
        (["data.shards=/x", "optim.base_lr=fast"], "optim.base_lr"),
        ([], "data.shards"),
        (["data.shards=/x", "model.name=cast_huge"], "model.name"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.pretrain", "--config", TINY, *overrides],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert "config error" in proc.stderr and key in proc.stderr
        assert "Ray" not in proc.stderr and "ray" not in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", TINY, "data.shards=/x"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "objective" in proc.stderr


def _job_logs(client, job_id) -> str:
    return client.get_job_logs(job_id)


def test_submitted_pretraining_survives_a_killed_worker(ray_head, s3_server, tmp_path, monkeypatch):
    from ray.job_submission import JobStatus

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.new_bucket()
    make_imagefolder(tmp_path / "src", num_classes=2, per_class=16, size=64)
    build_shards(str(tmp_path / "src"), f"s3://{bucket}/shards", "imagefolder", max_count=8, progress=False)

    name = "moco-tiny-kill"
    overrides = [
        f"data.shards=s3://{bucket}/shards",
        "data.batch_size=4",
        "ray.num_workers=2",
        f"ray.storage_path=s3://{bucket}/runs",
        f"ray.name={name}",
        "ray.max_failures=2",
        "schedule.epochs=8",
        "schedule.warmup_epochs=1",
        "optim.base_lr=0.05",
        "checkpoint.every_steps=4",
        "checkpoint.keep=2",
        "logging.every_steps=1",
    ]
    entrypoint = ["python", "-m", "jobs.pretrain", "--config", TINY, *overrides]
    job_id = submit_job(ray_head, entrypoint, s3_server.env)
    client = ray_head.client()

    # wait for a checkpoint in S3, then SIGKILL one training worker process
    deadline = time.monotonic() + 240
    killed = None
    while killed is None and time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        assert status not in (JobStatus.FAILED, JobStatus.STOPPED), _job_logs(client, job_id)
        logs = _job_logs(client, job_id)
        pids = sorted(set(re.findall(r"\(RayTrainWorker pid=(\d+)", logs)))
        if re.search(r"\[cast-train\] .*\| checkpoint ", logs) and pids:  # registered by the controller
            killed = int(pids[-1])
            os.kill(killed, signal.SIGKILL)
        else:
            time.sleep(1)
    assert killed, "no checkpoint appeared before the deadline"

    logs = finished_job_logs(ray_head, job_id, timeout=deadline + 240 - time.monotonic())

    # the restarted worker group resumed from the checkpoint, not from step 0
    resumed = [int(s) for s in re.findall(r"\[cast-train\] resumed at step (\d+)", logs)]
    assert resumed and resumed[0] > 0, logs[-4000:]
    steps_and_losses = [(int(s), float(v)) for s, v in re.findall(r"\| step (\d+) \| loss ([0-9.]+)", logs)]
    final_step = max(s for s, _ in steps_and_losses)
    assert final_step == 8 * 4  # 32 images / (2 workers x 4) = 4 steps per epoch, 8 epochs
    by_step = dict(steps_and_losses)  # the last line per step (after the restart, the resumed run's)
    first_epoch = [by_step[s] for s in (1, 2, 3, 4)]
    last_epoch = [by_step[s] for s in range(final_step - 3, final_step + 1)]
    assert sum(last_epoch) < sum(first_epoch) - 0.2, steps_and_losses  # ~0.1 per step lower on average

    # checkpoints (complete, at most `keep`), the resolved config and TensorBoard events live in S3
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"runs/{name}/").get("Contents", [])]
    checkpoints = {k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_epoch")}
    assert 1 <= len(checkpoints) <= 2
    assert all(
        f"runs/{name}/{c}/_COMPLETE" in keys and f"runs/{name}/{c}/state.pt" in keys for c in checkpoints
    )
    assert f"runs/{name}/config.yaml" in keys
    assert any("/tensorboard/" in k and "events" in k for k in keys)


def test_a_sweep_whose_driver_is_killed_is_restored_and_finishes_without_rerunning_finished_trials(
        ray_head, tmp_path):
    import yaml
    from ray.job_submission import JobStatus
    from ray.tune import ExperimentAnalysis

    make_imagefolder(tmp_path / "src", num_classes=2, per_class=4, size=64)
    shards = str(tmp_path / "shards")
    build_shards(str(tmp_path / "src"), shards, "imagefolder", max_count=4, progress=False)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        **yaml.safe_load((REPO / "jobs/configs/sweep_moco_tiny.yaml").read_text()),
        "overrides": tiny_sweep_overrides(shards, tmp_path),
        "max_concurrent_trials": 2, "storage_path": str(tmp_path / "sweeps"), "name": "sweep",
    }))
    entrypoint = ["python", "-m", "jobs.sweep", "--config", str(sweep_file)]
    # trials that have not reported yet have no result.json: expected while polling, not a warning
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    folder = tmp_path / "sweeps" / "sweep"
    client = ray_head.client()
    job_id = submit_job(ray_head, entrypoint, {})

    def finished_trials() -> dict[str, str]:
        """Trials the sweep's saved state records as finished: their result.json text, by trial id."""
        if not list(folder.glob("experiment_state-*.json")):
            return {}
        trials = ExperimentAnalysis(str(folder)).trials
        return {t.trial_id: (Path(t.path) / "result.json").read_text()
                for t in trials if t.status == "TERMINATED"}

    deadline = time.monotonic() + 300
    while not (finished := finished_trials()):
        assert client.get_job_status(job_id) not in (JobStatus.FAILED, JobStatus.STOPPED), \
            _job_logs(client, job_id)[-4000:]
        assert time.monotonic() < deadline, "no trial finished"
        time.sleep(1)
    assert len(finished) < 4, "the sweep finished before its driver could be killed"
    os.kill(int(client.get_job_info(job_id).driver_info.pid), signal.SIGKILL)
    finished_job_logs(ray_head, job_id, timeout=60, expect="FAILED")

    logs = finished_job_logs(ray_head, submit_job(ray_head, entrypoint, {}), timeout=400)
    assert f"[cast-sweep] restoring {folder}" in logs
    assert re.search(r"sweep sweep: 4 trials, 0 failed; best config: \S+best_config\.yaml", logs), \
        logs[-4000:]
    after = finished_trials()
    assert len(after) == 4
    assert {trial: after[trial] for trial in finished} == finished  # recorded results untouched: not rerun
