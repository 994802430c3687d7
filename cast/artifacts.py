"""What a run leaves in storage, and how to read it back: checkpoint folders and result JSONs.

Training writes these and evaluation, inference and later runs read them, so the format lives here,
below both (neither ``cast.train`` nor ``cast.eval`` imports the other for it).

- A **checkpoint** is a folder holding ``state.pt`` (tensors and primitives only, read back with
  ``torch.load(weights_only=True)``) and ``config.yaml``; ``_COMPLETE`` is written into it after its
  upload finished, so a folder without it is an interrupted save and is never picked up.
- A **result** of a checkpoint (evaluation, linear probe) is ``<checkpoint>.<name>.json`` beside the
  checkpoint file or folder, written under a temporary name and moved into place.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import tempfile

import fsspec
import torch

from cast.storage import RetryPolicy, join, read_text, write_text

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
COMPLETE_MARKER = "_COMPLETE"
CHECKPOINT_PREFIX = "checkpoint_"


def write_checkpoint(folder: str, state: dict, config_yaml: str) -> str:
    """Write ``state`` and the resolved config into ``folder`` (a fresh local folder)."""
    torch.save(state, os.path.join(folder, STATE_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        f.write(config_yaml)
    return folder


LOCAL_CHECKPOINT_PREFIX = "cast-ckpt-"


def new_checkpoint_folder(state: dict, config_yaml: str) -> str:
    """A new local temp folder holding the checkpoint; on any error it is removed and re-raised.

    Its name carries the writer's pid, so that a folder left by a killed worker (mid-save or
    mid-upload) is found and removed on the next start (``remove_orphaned_checkpoint_folders``)."""
    folder = tempfile.mkdtemp(prefix=f"{LOCAL_CHECKPOINT_PREFIX}{os.getpid()}-")
    try:
        return write_checkpoint(folder, state, config_yaml)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def remove_orphaned_checkpoint_folders(root: str | None = None) -> list[str]:
    """Remove the local checkpoint folders under ``root`` (the temp dir) whose writer process is gone;
    the removed paths. Folders of live processes (other workers of this machine) are left alone."""
    root = root or tempfile.gettempdir()
    removed = []
    for entry in os.scandir(root):
        match = re.fullmatch(rf"{LOCAL_CHECKPOINT_PREFIX}(\d+)-\w+", entry.name)
        if match is None or not entry.is_dir() or _alive(int(match.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def read_state(location: str) -> dict:
    """``state.pt`` of a checkpoint folder (local path or any fsspec URL), tensors and primitives only."""
    url = location if location.endswith(STATE_FILE) else join(location, STATE_FILE)
    with fsspec.open(url, "rb") as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def latest_checkpoint(location: str) -> str:
    """``location`` itself when it is a checkpoint, else its newest complete ``checkpoint_*`` sub-folder."""
    fs, path = fsspec.core.url_to_fs(location)
    path = path.rstrip("/")
    if fs.exists(f"{path}/{STATE_FILE}"):
        return location.rstrip("/")
    names = sorted(
        os.path.basename(p.rstrip("/"))
        for p in fs.ls(path, detail=False)
        if os.path.basename(p.rstrip("/")).startswith(CHECKPOINT_PREFIX)
    )
    complete = [n for n in names if fs.exists(f"{path}/{n}/{COMPLETE_MARKER}")]
    if not complete:
        raise FileNotFoundError(
            f"no complete checkpoint in {location} "
            f"(no {STATE_FILE}, no {CHECKPOINT_PREFIX}* folder with {COMPLETE_MARKER})"
        )
    return join(location, complete[-1])


def report_url(checkpoint: str, name: str = "eval") -> str:
    """``<checkpoint>.<name>.json``, beside the checkpoint file or directory."""
    return f"{checkpoint.rstrip('/')}.{name}.json"


def write_report(results: dict, url: str, policy: RetryPolicy | None = None) -> str:
    """Write ``results`` as indented JSON to ``url`` (NaN becomes null) under the storage ``policy``;
    returns ``url``."""
    return write_text(url, json.dumps(_finite(results), indent=2, sort_keys=False) + "\n", policy)


def read_report(url: str) -> dict | None:
    """A JSON result (e.g. a linear-probe result) or None when there is none at ``url``."""
    text = read_text(url)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{url}: not valid JSON ({error})") from error


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
