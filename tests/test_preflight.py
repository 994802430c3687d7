"""The driver's preflight: each config error that used to reach the workers (and cost a cluster)
exits 2 naming the config key, in one real job process, before any Ray process starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import pytest

from cast.config import ConfigError, load_config
from cast.train.config import TrainConfig
from cast.train.preflight import PROBE_PREFIX, run_preflight
from data_tools.make_shards import build_shards
from tests.fixtures.datasets import make_imagefolder

REPO = Path(__file__).resolve().parents[1]
TINY = "jobs/configs/moco_cast_tiny.yaml"
SUPERVISED = "jobs/configs/supervised_cast_tiny.yaml"
SWEEP = "jobs/configs/sweep_moco_tiny.yaml"

# what the job process runs: every case through the real entry point, then proof that Ray never started
DRIVER = """
import glob, json, os, sys
from cast.train.cli import run_training_job
from cast.tune.cli import run_sweep_job
results = [run_sweep_job(argv) if objective == "sweep" else run_training_job(argv, objective)
           for objective, argv in json.loads(sys.argv[1])]
import ray
children = []
for stat in glob.glob("/proc/[0-9]*/stat"):
    try:
        fields = open(stat).read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    if int(fields[1]) == os.getpid():  # parent pid
        children.append(stat)
print(json.dumps({"codes": results, "ray_initialized": ray.is_initialized(), "children": children}))
"""


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """2 classes x 8 images in 4 local shards of 4."""
    root = tmp_path_factory.mktemp("preflight")
    make_imagefolder(root / "src", num_classes=2, per_class=8, size=32)
    build_shards(str(root / "src"), str(root / "shards"), "imagefolder", max_count=4, progress=False)
    return root


def test_each_preflight_failure_exits_2_naming_the_key_before_any_ray_process(
    labelled, s3_server, s3_env, tmp_path
):
    bucket = s3_env
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, **s3_server.env, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # reaching ray.init would start a local cluster: none may appear
    build_shards(str(labelled / "src"), f"s3://{bucket}/shards", "imagefolder", max_count=4, progress=False)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    client.delete_object(Bucket=bucket, Key="shards/train-000002.tar")  # listed in _info.json, gone
    local = str(labelled / "shards")
    ok = [f"data.shards={local}", f"ray.storage_path={tmp_path / 'runs'}"]
    cases = [
        ("moco", ["data.shards=s3://no-such-bucket-cast/shards"], "data.shards"),
        ("moco", [f"data.shards={tmp_path}/nowhere"], "data.shards"),
        ("moco", [f"data.shards=s3://{bucket}/shards"], "do not exist: s3:"),
        ("moco", [*ok, "ray.storage_path=s3://no-such-bucket-cast/runs"], "ray.storage_path"),
        ("moco", [*ok, "data.batch_size=9"], "data.batch_size"),  # 9 x 2 workers > 16 samples
        ("moco", [*ok, "optim.global_batch=20"], "optim.global_batch"),
        ("moco", [*ok, "data.superpixels=none"], "data.superpixels"),
        ("moco", [*ok, "model.kwargs.imgsize=64"], "model.kwargs.imgsize"),
        ("moco", [*ok, "model.kwargs.img_size=big"], "model.kwargs.img_size"),
        ("moco", [*ok, "model.kwargs.depths=[1,1,1]"], "model.kwargs"),  # 3 depths, 4 cluster counts
        ("supervised", [*ok, "supervised.num_classes=1"], "supervised.num_classes"),
        # a sweep: its base config, then every listed value, as a trial would train with it
        ("sweep", [f"overrides=[data.shards={tmp_path}/nowhere]"], "base: data.shards"),
        ("sweep", [f"overrides=[data.shards={local},ray.num_workers=1]",  # 17 x 1 worker > 16 samples
                   "search={data.batch_size: {grid: [2, 17]}}"],
         "search.data.batch_size=17: data.batch_size"),
    ]
    configs = {"supervised": SUPERVISED, "sweep": SWEEP}
    calls = [(objective, ["--config", configs.get(objective, TINY), *overrides,
                          *([f"storage_path={tmp_path}/sweeps"] if objective == "sweep" else [])])
             for objective, overrides, _ in cases]
    try:
        proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(calls)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        sessions = list(Path(ray_tmp).rglob("session_*"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [2] * len(cases), proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error: ")]
    assert len(errors) == len(cases), proc.stderr[-3000:]
    for (_, _, expected), error in zip(cases, errors):
        assert expected in error, (expected, error)
    assert errors[2].startswith("config error: data.shards: 1 of 4 shards")
    assert errors[7].startswith("config error: model.kwargs.imgsize: not an option of cast_tiny")
    assert errors[8].startswith("config error: model.kwargs.img_size: expected int")
    # no Ray process: never initialised, no child process, no Ray session folder
    assert result == {**result, "ray_initialized": False, "children": []}
    assert sessions == []


def test_a_good_config_passes_and_leaves_no_probe_behind(labelled, s3_env):
    runs = f"s3://{s3_env}/runs"
    cfg = load_config(TrainConfig, str(REPO / TINY), [f"data.shards={labelled / 'shards'}",
                                                      f"ray.storage_path={runs}", "ray.name=x"])
    lines = run_preflight(cfg)
    assert any(line.startswith("data.shards: 4 shards, 16 samples") for line in lines)
    assert any("writable" in line for line in lines)
    import fsspec

    assert not [p for p in fsspec.filesystem("s3").find(s3_env) if PROBE_PREFIX in p]
    cfg.optim.grad_accum_steps = 2  # 8 x 2 workers x 2 = 32 images per step > 16 samples
    with pytest.raises(ConfigError, match=r"^data.batch_size: 16 samples .* 32 images = data.batch_size 8 x"):
        run_preflight(cfg)
