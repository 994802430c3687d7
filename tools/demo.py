"""``make demo``: the project end to end on one machine, on real images that are available offline.

Steps, each printed and timed: sample images (Fashion-MNIST from Debian's dataset-fashion-mnist; the
scikit-image photos) -> WebDataset shards -> a Ray head on 127.0.0.1 -> ``ray job submit`` of a short
MoCo pretraining of cast_tiny -> Ray stopped -> kNN accuracy of the trained model and of a randomly
initialised one -> hierarchical segmentation overlays of a few photos -> a summary (also as JSON).

The jobs run as users run them (the ``ray`` CLI, ``python -m jobs.evaluate``, ``python -m jobs.segment``),
each command printed, its output streamed and kept under ``<out>/logs``. Ray is stopped as soon as
training ends (the later steps need no cluster, and on 2 cores its idle processes slow them down), and
always, also when a step fails or on Ctrl-C. Without Fashion-MNIST the labelled set is random crops of
the photos, one class per photo (``data_tools.photo_crops``), and the demo says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from cast.local_ray import VENV_BIN, RayHead, local_ray_head

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "jobs/configs/moco_cast_tiny_demo.yaml"
SEGMENT_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
RUN_NAME = "demo"
# What one demo run writes under its output folder; removed first, so every run starts clean (shards
# refuse a different plan, and Ray Train would resume a finished run of the same name).
OUTPUTS = ("data", "shards", "runs", "eval", "segments", "logs", "summary.json")


class DemoError(RuntimeError):
    """A step failed; the message names the step and its log."""


@dataclass
class DemoOptions:
    out: str = "demo_out"
    train_per_class: int = 200  # Fashion-MNIST train images per class (kNN memory and MoCo data)
    val_per_class: int = 50  # Fashion-MNIST test images per class, scored by kNN
    image_size: int = 64  # training and kNN view size
    epochs: int = 5
    batch_size: int = 32  # per Ray Train worker (2 workers)
    photos: tuple[str, ...] = SEGMENT_PHOTOS  # scikit-image photos to segment
    segment_size: int = 224  # view size for the overlays
    config: str = DEMO_CONFIG
    overrides: tuple[str, ...] = ()  # extra key=value for jobs.pretrain
    fashion_mnist: str = "/usr/share/datasets/fashion-mnist"

    def validate(self) -> None:
        from data_tools.sample_data import SKIMAGE_PHOTOS

        for name in ("train_per_class", "val_per_class", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("image_size", "segment_size"):
            if getattr(self, name) < 16 or getattr(self, name) % 8:
                raise ValueError(f"demo: {name} must be a multiple of 8 and >= 16, got {getattr(self, name)}")
        unknown = [p for p in self.photos if p not in SKIMAGE_PHOTOS]
        if unknown or not self.photos:
            raise ValueError(
                f"demo: photos {unknown or '(none)'}: expected names from {', '.join(SKIMAGE_PHOTOS)}"
            )
        if not (REPO / self.config).exists() and not Path(self.config).exists():
            raise ValueError(f"demo: config {self.config} not found")


# The CI test's settings: the same steps on a few hundred images, one epoch, three small overlays.
QUICK = {
    "train_per_class": 16,
    "val_per_class": 8,
    "epochs": 1,
    "batch_size": 16,
    "photos": SEGMENT_PHOTOS[:3],
    "segment_size": 128,
}


@dataclass
class Steps:
    """Numbered, timed steps; the timings go into the summary."""

    total: int
    seconds: dict[str, float] = field(default_factory=dict)
    current: str = ""

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        number = len(self.seconds) + 1
        self.current = title
        print(f"\n[demo] step {number}/{self.total}: {title}", flush=True)
        started = time.perf_counter()
        yield
        self.seconds[title] = time.perf_counter() - started
        print(f"[demo] step {number}/{self.total} done in {self.seconds[title]:.1f} s", flush=True)


def run_command(command: list[str], log: Path, env: dict | None = None) -> None:
    """Run ``command`` in the repository, streaming its output to the console and to ``log``.
    Raises DemoError on a non-zero exit."""
    print(f"$ {shlex.join(command)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                handle.write(line)
            proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: do not leave it running
                proc.kill()
                proc.wait()
    if proc.returncode:
        raise DemoError(f"`{shlex.join(command[:4])} ...` exited with {proc.returncode}; see {log}")


def _python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines as they happen


class Demo:
    """One demo run into ``options.out``; ``run()`` returns the summary dict (also in summary.json)."""

    def __init__(self, options: DemoOptions):
        options.validate()
        self.options = options
        self.out = Path(options.out).resolve()
        self.logs = self.out / "logs"
        self.steps = Steps(total=8)
        self.summary: dict = {"options": asdict(options), "out": str(self.out)}

    def run(self) -> dict:
        started = time.perf_counter()
        self._clean()
        with self.steps.step("sample images (Fashion-MNIST subsets, scikit-image photos)"):
            self.sample_images()
        with self.steps.step("WebDataset shards"):
            self.shards()
        with contextlib.ExitStack() as ray_cluster:
            with self.steps.step("start a Ray head on 127.0.0.1"):
                head = ray_cluster.enter_context(local_ray_head(num_cpus=2))
                self.summary["ray"] = {"address": head.address, "pid": head.pid, "temp_dir": head.temp_dir}
                print(f"Ray head: {head.address} (pid {head.pid}, logs under {head.temp_dir})")
            with self.steps.step("MoCo pretraining of cast_tiny (ray job submit)"):
                self.pretrain(head)
            with self.steps.step("stop Ray"):
                ray_cluster.close()
        with self.steps.step("kNN accuracy of the pretrained model"):
            self.knn("trained")
        with self.steps.step("kNN accuracy of a randomly initialised model (baseline)"):
            self.knn("random_init")
        with self.steps.step("hierarchical segmentation overlays"):
            self.segment()
        self.summary["seconds"] = {**self.steps.seconds, "total": time.perf_counter() - started}
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1) + "\n")
        return self.summary

    # --- steps -----------------------------------------------------------------------------------------

    def _clean(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def sample_images(self) -> None:
        from data_tools.photo_crops import photo_crops
        from data_tools.sample_data import fashion_mnist, skimage_photos

        o, data = self.options, self.out / "data"
        photos = skimage_photos(data / "photos")
        try:
            splits = (("train", "train", o.train_per_class), ("val", "test", o.val_per_class))
            for folder, split, per_class in splits:  # the val folder holds Fashion-MNIST's test split
                fashion_mnist(
                    data / folder,
                    split=split,
                    per_class=per_class,
                    size=o.image_size,
                    source=Path(o.fashion_mnist),
                )
            source = f"Fashion-MNIST ({o.fashion_mnist}): train and test images"
        except FileNotFoundError as error:
            print(
                f"[demo] NOTE: {error}\n[demo] NOTE: falling back to random crops of the scikit-image "
                "photos, one class per photo (kNN then tells the photos apart)"
            )
            shutil.rmtree(data / "train", ignore_errors=True)
            photo_crops(photos, data / "train", per_class=o.train_per_class, size=o.image_size, seed=0)
            photo_crops(photos, data / "val", per_class=o.val_per_class, size=o.image_size, seed=1)
            source = f"crops of the scikit-image photos in {photos} (Fashion-MNIST not installed)"
        counts = {split: sum(1 for p in (data / split).rglob("*.png")) for split in ("train", "val")}
        self.summary["data"] = {"source": source, "images": counts, "photos": str(photos)}
        print(f"{counts['train']} train and {counts['val']} val images at {o.image_size} px from {source}")

    def shards(self) -> None:
        from data_tools.make_shards import build_shards

        self.summary["shards"] = {}
        # 8 train shards: at least one per reader (2 Ray Train workers); 4 val shards for the eval loader
        for split, pieces in (("train", 8), ("val", 4)):
            count = self.summary["data"]["images"][split]
            info = build_shards(
                str(self.out / "data" / split),
                str(self.out / "shards" / split),
                "imagefolder",
                name=split,
                max_count=math.ceil(count / pieces),
                progress=False,
            )
            print(
                f"{split}: {info.num_samples} samples in {info.num_shards} shards, "
                f"{len(info.classes)} classes -> {info.url}"
            )
            self.summary["shards"][split] = str(self.out / "shards" / split)

    def pretrain(self, head: RayHead) -> None:
        o = self.options
        submission_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        overrides = [
            f"data.shards={self.summary['shards']['train']}",
            f"ray.storage_path={self.out / 'runs'}",
            f"ray.name={RUN_NAME}",
            f"data.image_size={o.image_size}",
            f"model.kwargs.img_size={o.image_size}",
            f"data.batch_size={o.batch_size}",
            f"schedule.epochs={o.epochs}",
            *o.overrides,
        ]
        command = [
            f"{VENV_BIN}/ray",
            "job",
            "submit",
            "--address",
            head.address,
            "--submission-id",
            submission_id,
            "--working-dir",
            ".",
            "--runtime-env",
            "cluster/runtime_env.yaml",
            "--",
            "python",
            "-m",
            "jobs.pretrain",
            "--config",
            o.config,
            *overrides,
        ]
        for attempt in range(3):  # a fresh head can still refuse with "No available agent"
            try:
                run_command(command, self.logs / "pretrain.log", env=head.env)
                break
            except DemoError:
                log = (self.logs / "pretrain.log").read_text()
                if attempt == 2 or "No available agent" not in log or "submitted successfully" in log:
                    raise
                time.sleep(2)
        status = str(head.client().get_job_status(submission_id))
        if status != "SUCCEEDED":
            raise DemoError(f"job {submission_id} ended {status}; see {self.logs / 'pretrain.log'}")
        run = self.out / "runs" / RUN_NAME
        from cast.artifacts import latest_checkpoint

        trained = yaml.safe_load((run / "config.yaml").read_text())  # the resolved config of the run
        self.summary["run"] = {
            "job": submission_id,
            "folder": str(run),
            "checkpoint": latest_checkpoint(str(run)),
            "model": trained["model"]["name"],
            # kNN must see the superpixels the model trained on (their count sets the token count)
            "superpixels": trained["data"]["superpixels"],
            "superpixel_params": trained["data"]["superpixel_params"],
        }

    def knn(self, which: str) -> None:
        o, run = self.options, self.summary["run"]
        result = self.out / "eval" / which
        weights = ["--random-init"] if which == "random_init" else ["--checkpoint", run["checkpoint"]]
        run_command(
            [
                sys.executable,
                "-m",
                "jobs.evaluate",
                *weights,
                "--model",
                run["model"],
                "--size",
                str(o.image_size),
                "--superpixels",
                run["superpixels"],
                *(
                    arg
                    for k, v in run["superpixel_params"].items()
                    for arg in ("--superpixel-param", f"{k}={v}")
                ),
                "--train-shards",
                self.summary["shards"]["train"],
                "--val-shards",
                self.summary["shards"]["val"],
                "--out",
                str(result),
                "--no-progress",
            ],
            self.logs / f"knn_{which}.log",
            env=_python_env(),
        )
        knn = json.loads(result.with_name(f"{which}.knn.json").read_text())
        self.summary.setdefault("knn", {})[which] = {
            "top1": knn["top1"],
            "k": knn["k"],
            "top5": knn["top5"],
            "json": str(result),
        }

    def segment(self) -> None:
        o, run = self.options, self.summary["run"]
        photos = Path(self.summary["data"]["photos"])
        out = self.out / "segments"
        run_command(
            [
                sys.executable,
                "-m",
                "jobs.segment",
                "--checkpoint",
                run["checkpoint"],
                "--model",
                run["model"],
                "--size",
                str(o.segment_size),
                "--images",
                *(str(photos / f"{p}.jpg") for p in o.photos),
                "--out",
                str(out),
                "--no-progress",
            ],
            self.logs / "segment.log",
            env=_python_env(),
        )
        manifest = json.loads((out / "segments.json").read_text())
        self.summary["segments"] = {
            "folder": str(out),
            "overlays": [entry["overlay"] for entry in manifest["images"]],
            "label_maps": [path for entry in manifest["images"] for path in entry["label_maps"]],
        }


def format_summary(summary: dict) -> str:
    """The closing table: step timings, kNN trained vs random init, and where every output is."""
    lines = ["", "=" * 78, f"cast-train demo: outputs under {summary['out']}", "", "wall time per step"]
    seconds = summary["seconds"]
    width = max(len(name) for name in seconds)
    lines += [f"  {name:<{width}}  {value:7.1f} s" for name, value in seconds.items()]
    knn, data = summary["knn"], summary["data"]
    lines += [
        "",
        f"kNN accuracy (k={knn['trained']['k']}) on {data['images']['val']} val images; "
        f"memory: {data['images']['train']} train images ({data['source']})",
    ]
    for which, label in (("trained", "MoCo-pretrained"), ("random_init", "random init")):
        lines.append(f"  {label:<16} top-1 {knn[which]['top1']:5.1f} %   top-5 {knn[which]['top5']:5.1f} %")
    gain = knn["trained"]["top1"] - knn["random_init"]["top1"]
    lines.append(
        f"  pretraining {'gained' if gain > 0 else 'did NOT improve on random init:'} {gain:+.1f} points"
    )
    run, segments = summary["run"], summary["segments"]
    lines += [
        "",
        "outputs",
        f"  shards       {summary['shards']['train']}  {summary['shards']['val']}",
        f"  run          {run['folder']}  (Ray job {run['job']})",
        f"  checkpoint   {run['checkpoint']}",
        f"  kNN results  {knn['trained']['json']}  {knn['random_init']['json']}",
        *(f"  overlay      {path}" for path in segments["overlays"]),
        f"  label maps   {segments['folder']}/labels  ({len(segments['label_maps'])} files)",
        f"  logs         {summary['out']}/logs",
        f"  summary      {summary['out']}/summary.json",
        "=" * 78,
    ]
    return "\n".join(lines)
