"""Checkpoint state of a run: what it needs to continue exactly where it stopped.

``TrainState`` assembles the state (model, optimizer, the objective's own state, data position,
every rank's RNG), writes it as a checkpoint folder (format in ``cast.artifacts``) and restores it. A
checkpoint is written to a fresh local temp folder and only then handed to ``ray.train.report``, which
registers it after the upload finished: an interrupted write or upload never replaces the last good
checkpoint. The upload goes through the storage policy (``cast.storage.retry``): transient errors are
retried up to ``checkpoint.retry.deadline_s``, permanent ones fail at once, naming the URL.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn

from cast.artifacts import (
    COMPLETE_MARKER,
    latest_checkpoint,
    new_checkpoint_folder,
    read_state,
    remove_orphaned_checkpoint_folders,
)
from cast.storage import RetryPolicy, retry
from cast.train.distributed import gather_objects

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where training stands, in units that do not depend on the world size: optimizer steps (of the
    recipe's fixed global batch), samples seen, and the segments of ``epoch`` not consumed yet."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0  # over all workers, since the start of the run
    # [partition, start, end) triples left of ``epoch`` (cast.data.reader); None = the epoch has not begun
    remaining: list | None = None
    world_size: int = 1  # of the group that wrote it (for the record: a restore may have another)
    # [world_size, DataLoader workers, micro-batch] of the loader that wrote ``remaining`` and its
    # ``rotation``: a restore with the same layout continues that loader's exact batch order
    layout: list | None = None
    rotation: int = 0

    @classmethod
    def from_state(cls, saved: dict) -> Position:
        if saved.get("batches_done", 0):
            raise ValueError(
                "checkpoint position: written before world-size independent positions (batches_done "
                f"{saved['batches_done']} mid-epoch); resume from an epoch-end checkpoint"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in known})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and primitives (weights_only-loadable)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(position: Position) -> str:
    """Sortable and unique per run: newest = last in name order."""
    return f"checkpoint_epoch{position.epoch:04d}_step{position.step:09d}"


class TrainState:
    """The state a worker checkpoints and restores; ``position`` is where the run stands."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, objective, *,
                 rank: int, world_size: int, seed: int, config_yaml: str, best=None):
        self.module, self.optimizer, self.objective, self.best = module, optimizer, objective, best
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.config_yaml = config_yaml
        self.position = Position(world_size=world_size)
        for folder in remove_orphaned_checkpoint_folders():  # left by a worker killed mid-save/upload
            log.info("removed the orphaned local checkpoint folder %s", folder)

    def save(self) -> str | None:
        """All ranks take part (their RNG states are gathered); rank 0 gets the local checkpoint folder
        (the caller reports and then removes it), the others None."""
        rngs = gather_objects(rng_state())
        if self.rank != 0:
            return None
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "position": asdict(self.position),
            "rng": rngs,
            **self.objective.state_dict(),
            **({"best": self.best.state_dict()} if self.best is not None else {}),
        }
        return new_checkpoint_folder(state, self.config_yaml)

    def restore(self, ray_checkpoint, resume_from: str = "") -> bool:
        """Continue from Ray's checkpoint of this run (after a restart), else from ``resume_from`` (a
        checkpoint or run folder); False when there is neither."""
        if ray_checkpoint is not None:
            with ray_checkpoint.as_directory() as folder:
                state = read_state(folder)
        elif resume_from:
            state = read_state(latest_checkpoint(resume_from))
        else:
            return False
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state)
        if self.best is not None:
            self.best.load_state_dict(state.get("best", {}))
        saved = Position.from_state(state["position"])
        self.position = dataclasses.replace(saved, world_size=self.world_size)
        if len(state["rng"]) == self.world_size:
            set_rng_state(state["rng"][self.rank])
        else:
            seed_everything(self.seed + self.rank + saved.step)
        return True


def retrying_upload(
    policy: RetryPolicy,
    destination: str,
    persist: Callable | None = None,
    sleep: Callable[[float], object] | None = None,
) -> Callable:
    """A ``checkpoint_upload_fn`` for ``ray.train.report``: the upload and its ``_COMPLETE`` marker
    under the storage policy (``destination``, the run folder, names the failure).

    ``persist(checkpoint, dir_name) -> Checkpoint`` defaults to Ray's own upload into the run's storage.
    Ray registers the checkpoint only after this returns, so a failed attempt leaves the last good one.
    """

    def upload(checkpoint, dir_name: str):
        do_persist = persist
        if do_persist is None:
            import ray.train

            do_persist = ray.train.get_context().get_storage().persist_current_checkpoint

        def attempt():
            persisted = do_persist(checkpoint, dir_name)
            with persisted.filesystem.open_output_stream(f"{persisted.path}/{COMPLETE_MARKER}") as f:
                f.write(b"ok\n")
            return persisted

        url = f"{destination.rstrip('/')}/{dir_name}"
        return retry(attempt, url, policy, key="ray.storage_path", what="checkpoint upload", sleep=sleep)

    return upload
