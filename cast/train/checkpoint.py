"""Checkpoint state: what a run needs to continue exactly where it stopped.

A checkpoint is a folder holding ``state.pt`` (tensors and primitives only, read back with
``torch.load(weights_only=True)``) and ``config.yaml``. It is written to a fresh local temp folder
and only then handed to ``ray.train.report``, which registers it after the upload finished: an
interrupted write or upload never replaces the last good checkpoint. Transient storage errors
during the upload are retried with exponential backoff (``retrying_upload``).
"""

from __future__ import annotations

import io
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import numpy as np
import torch

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
COMPLETE_MARKER = "_COMPLETE"  # written after the upload: a folder without it is an interrupted upload

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where training stands: optimizer steps taken, epoch, and batches of that epoch consumed per rank."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches of ``epoch`` this rank already trained on
    world_size: int = 1


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


def write_checkpoint(folder: str, state: dict, config_yaml: str) -> str:
    """Write ``state`` and the resolved config into ``folder`` (a fresh local folder)."""
    torch.save(state, os.path.join(folder, STATE_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        f.write(config_yaml)
    return folder


def new_checkpoint_folder(state: dict, config_yaml: str) -> str:
    """A new temp folder holding the checkpoint; on any error it is removed and nothing is reported."""
    folder = tempfile.mkdtemp(prefix="cast-ckpt-")
    try:
        return write_checkpoint(folder, state, config_yaml)
    except BaseException:
        _remove_tree(folder)
        raise


def read_state(location: str) -> dict:
    """``state.pt`` of a checkpoint folder (local path or any fsspec URL), tensors and primitives only."""
    url = location if location.endswith(STATE_FILE) else location.rstrip("/") + "/" + STATE_FILE
    with fsspec.open(url, "rb") as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def latest_checkpoint(location: str) -> str:
    """``location`` itself when it is a checkpoint, else its newest ``checkpoint_*`` sub-folder."""
    fs, path = fsspec.core.url_to_fs(location)
    path = path.rstrip("/")
    if fs.exists(f"{path}/{STATE_FILE}"):
        return location.rstrip("/")
    names = sorted(
        os.path.basename(p.rstrip("/"))
        for p in fs.ls(path, detail=False)
        if os.path.basename(p.rstrip("/")).startswith("checkpoint_")
    )
    complete = [n for n in names if fs.exists(f"{path}/{n}/{COMPLETE_MARKER}")]
    if not complete:
        raise FileNotFoundError(
            f"no complete checkpoint in {location} "
            f"(no {STATE_FILE}, no checkpoint_* folder with {COMPLETE_MARKER})"
        )
    return location.rstrip("/") + "/" + complete[-1]


def checkpoint_name(position: Position) -> str:
    """Sortable and unique per run: newest = last in name order."""
    return f"checkpoint_epoch{position.epoch:04d}_step{position.step:09d}"


def retrying_upload(
    attempts: int,
    backoff_s: float,
    persist: Callable | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Callable:
    """A ``checkpoint_upload_fn`` for ``ray.train.report`` that retries transient storage errors.

    ``persist(checkpoint, dir_name) -> Checkpoint`` defaults to Ray's own upload into the run's storage.
    Ray registers the checkpoint only after this returns, so a failed attempt leaves the last good one.
    """

    def upload(checkpoint, dir_name: str):
        do_persist = persist
        if do_persist is None:
            import ray.train

            do_persist = ray.train.get_context().get_storage().persist_current_checkpoint
        for attempt in range(1, attempts + 1):
            try:
                persisted = do_persist(checkpoint, dir_name)
                with persisted.filesystem.open_output_stream(f"{persisted.path}/{COMPLETE_MARKER}") as f:
                    f.write(b"ok\n")
                return persisted
            except OSError as e:  # pyarrow / fsspec / botocore connection errors all derive from OSError
                if attempt == attempts:
                    raise
                delay = backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "checkpoint upload %s failed (attempt %d/%d: %s); retrying in %.1fs",
                    dir_name,
                    attempt,
                    attempts,
                    e,
                    delay,
                )
                sleep(delay)
        raise AssertionError("unreachable")

    return upload


def _remove_tree(folder: str) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
