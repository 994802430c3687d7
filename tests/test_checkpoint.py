"""Checkpoint IO: exact save/restore (weights, optimizer, RNG, data position), interrupted saves,
retried uploads."""

import os
import random
import tempfile

import numpy as np
import pyarrow.fs
import pytest
import torch
from botocore.exceptions import EndpointConnectionError
from ray.train import Checkpoint
from torch import nn

from cast import artifacts as ckpt
from cast.artifacts import COMPLETE_MARKER, latest_checkpoint, new_checkpoint_folder, read_state
from cast.storage import PermanentStorageError, RetryPolicy, StorageUnreachable
from cast.train.checkpoint import (
    Position,
    TrainState,
    checkpoint_name,
    retrying_upload,
    rng_state,
    set_rng_state,
)


def _model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _state(position: Position):
    model, optimizer = _model_and_optimizer()
    return (
        model,
        optimizer,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "position": vars(position),
            "rng": [rng_state()],
        },
    )


def _persist_into(storage):
    """Ray's own upload step, into a local 'bucket' folder (what persist_current_checkpoint does)."""

    def persist(checkpoint, name):
        dest = os.path.join(storage, name)
        os.makedirs(dest, exist_ok=True)
        pyarrow.fs.copy_files(checkpoint.path, dest)
        return Checkpoint(path=dest, filesystem=pyarrow.fs.LocalFileSystem())

    return persist


def test_save_restore_is_exact(tmp_path):
    position = Position(step=37, epoch=2, samples_seen=600, remaining=[[0, 4, 10], [3, 0, 10]], world_size=2)
    model, optimizer, state = _state(position)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state["rng"] = [rng_state()]
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    folder = new_checkpoint_folder(state, "objective: moco\n")
    restored = read_state(folder)  # torch.load(weights_only=True) inside
    fresh = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    fresh.load_state_dict(restored["model"])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_opt.load_state_dict(restored["optimizer"])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(
        optimizer.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"]
    )
    assert Position(**restored["position"]) == position
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(restored["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    assert open(os.path.join(folder, ckpt.CONFIG_FILE)).read() == "objective: moco\n"


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    storage = str(tmp_path / "run")
    upload = retrying_upload(RetryPolicy(deadline_s=0), storage, persist=_persist_into(storage))
    good_position = Position(step=10, epoch=1)
    _, _, state = _state(good_position)
    upload(Checkpoint.from_directory(new_checkpoint_folder(state, "")), checkpoint_name(good_position))
    good = latest_checkpoint(storage)

    def crash_midway(obj, path):  # a worker dying while writing: half a file, then the error
        with open(path, "wb") as f:
            f.write(b"\x80partial")
        raise OSError("disk full")

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(ckpt.torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        new_checkpoint_folder(state, "")
    monkeypatch.undo()
    assert os.listdir(scratch) == []  # the half-written folder is gone and was never reported
    # an upload that dies part-way (the folder exists without its marker) is not picked either
    os.makedirs(os.path.join(storage, checkpoint_name(Position(step=20, epoch=1))))
    assert latest_checkpoint(storage) == good
    assert Position(**read_state(good)["position"]) == good_position


def test_transient_upload_errors_are_retried(tmp_path):
    storage = str(tmp_path / "run")
    real = _persist_into(storage)
    failures = [OSError("503 Slow Down"), EndpointConnectionError(endpoint_url="http://127.0.0.1:1")]

    def flaky(checkpoint, name):
        if failures:
            raise failures.pop(0)
        return real(checkpoint, name)

    delays = []
    _, _, state = _state(Position(step=3))
    policy = RetryPolicy(deadline_s=60, first_delay_s=0.5, max_delay_s=10)
    persisted = retrying_upload(policy, storage, persist=flaky, sleep=delays.append)(
        Checkpoint.from_directory(new_checkpoint_folder(state, "")), "checkpoint_a"
    )
    assert len(delays) == 2 and 0 <= delays[0] <= 0.5 and 0 <= delays[1] <= 1.0  # backoff with jitter
    assert os.path.exists(os.path.join(persisted.path, COMPLETE_MARKER))
    assert latest_checkpoint(storage).endswith("checkpoint_a")
    always = retrying_upload(
        RetryPolicy(deadline_s=0), storage, persist=lambda c, n: (_ for _ in ()).throw(OSError("down")),
        sleep=delays.append,
    )
    with pytest.raises(StorageUnreachable, match=r"checkpoint_b \(ray.storage_path\).*down"):
        always(Checkpoint.from_directory(new_checkpoint_folder(state, "")), "checkpoint_b")
    denied = retrying_upload(  # permanent: not retried at all
        policy, storage, persist=lambda c, n: (_ for _ in ()).throw(PermissionError("AccessDenied")),
        sleep=lambda s: pytest.fail("a 403 was retried"),
    )
    with pytest.raises(PermanentStorageError, match="not retried"):
        denied(Checkpoint.from_directory(new_checkpoint_folder(state, "")), "checkpoint_c")
    assert latest_checkpoint(storage).endswith("checkpoint_a")


def test_a_killed_writers_local_checkpoint_folder_is_removed_on_the_next_start(tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys

    from cast.artifacts import remove_orphaned_checkpoint_folders

    def killed_writer() -> str:
        writer = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; from cast.artifacts import new_checkpoint_folder; "
             "print(new_checkpoint_folder({'w': 1}, ''), flush=True); time.sleep(600)"],
            env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE, text=True,
        )
        folder = writer.stdout.readline().strip()
        os.kill(writer.pid, signal.SIGKILL)  # a worker killed between save and upload
        writer.wait()
        assert os.path.isdir(folder) and os.path.dirname(folder) == str(tmp_path)
        return folder

    orphan = killed_writer()
    live = tempfile.mkdtemp(prefix=f"cast-ckpt-{os.getpid()}-", dir=tmp_path)  # this process: alive
    assert remove_orphaned_checkpoint_folders(str(tmp_path)) == [orphan]
    assert not os.path.exists(orphan) and os.path.isdir(live)
    orphan = killed_writer()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, optimizer = _model_and_optimizer()
    TrainState(model, optimizer, None, rank=0, world_size=1, seed=0, config_yaml="")  # a worker's start
    assert not os.path.exists(orphan) and os.path.isdir(live)
