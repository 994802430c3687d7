"""Offline checks of cluster/: launcher YAMLs against the autoscaler schema that ships inside
the pinned ray package, the project's own rules for them (spot GPU workers from 0, pinned image
and torch, no keys), what `ray job submit` would upload with cluster/runtime_env.yaml, and the
KubeRay manifests' structure. There is no cloud, kubectl server or rsync here."""

import copy
import re
import shlex
import socket
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._private.runtime_env.packaging import create_package
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = {"aws": CLUSTER / "aws-gpu.yaml", "gcp": CLUSTER / "gcp-gpu.yaml"}
KUBERAY = CLUSTER / "kuberay"
RAYJOBS = {"pretrain": KUBERAY / "rayjob-pretrain.yaml", "sweep": KUBERAY / "rayjob-sweep.yaml"}
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def makefile_torch_pin() -> str:
    """The `torch==X torchvision==Y` pair the Makefile installs: the one pin clusters must match."""
    match = re.search(r"install -q (torch==\S+ torchvision==\S+)", (ROOT / "Makefile").read_text())
    assert match, "Makefile no longer pins torch/torchvision in `install`"
    return match.group(1)


@pytest.fixture
def no_network(monkeypatch):
    """Fail any outbound connection, to prove that schema validation calls no cloud API."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during offline validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


JOB_CONFIGS = {"pretrain": "TrainConfig", "train": "TrainConfig", "linear_probe": "TrainConfig",
               "sweep": "SweepConfig"}


def assert_valid_job_command(argv: list[str]) -> None:
    """``python -m jobs.X --config Y key=value ...`` names a shipped config and only real, typed keys."""
    from cast.config import load_config
    from cast.train.config import TrainConfig
    from cast.tune import SweepConfig

    classes = {"TrainConfig": TrainConfig, "SweepConfig": SweepConfig}
    module, config_path, overrides = argv[2], argv[4], argv[5:]
    job = module.removeprefix("jobs.")
    assert job in JOB_CONFIGS, f"unknown job module {module}"
    assert (ROOT / config_path).is_file(), f"{config_path} is not shipped"
    load_config(classes[JOB_CONFIGS[job]], str(ROOT / config_path), overrides)  # raises on a wrong key/type


def test_cluster_readme_job_commands_use_real_config_keys():
    commands = [line.split(" -- ", 1)[1] for line in (CLUSTER / "README.md").read_text().splitlines()
                if "ray job submit" in line and " -- python -m jobs." in line]
    assert len(commands) >= 4
    for command in commands:
        assert_valid_job_command(shlex.split(command))


def validated(raw: dict) -> dict:
    config = prepare_config(copy.deepcopy(raw))  # merges the provider's bundled defaults.yaml
    validate_config(config)
    return config


def worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


# ---------------------------------------------------------------- launcher YAMLs (ray up)


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_yaml_passes_the_autoscaler_schema(cloud, no_network):
    config = validated(load(LAUNCHERS[cloud]))
    assert config["provider"]["type"] == cloud
    assert worker_types(config), "no worker node types"


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda c: c.update(max_workers="four"), "'four' is not of type 'integer'"),
        (lambda c: c["available_node_types"][c["head_node_type"]].pop("node_config"), "node_config"),
        (lambda c: next(iter(worker_types(c).values())).update(min_worker=0), "min_worker"),
        (lambda c: c["docker"].update(imag="rayproject/ray:latest"), "imag"),
    ],
    ids=["max_workers-string", "missing-node_config", "typo-min_worker", "typo-docker-image"],
)
@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_corrupted_launcher_yaml_fails_validation(cloud, corrupt, message, no_network):
    raw = load(LAUNCHERS[cloud])
    corrupt(raw)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        validated(raw)


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_pins_image_and_installs_pinned_torch_then_project(cloud):
    config = load(LAUNCHERS[cloud])
    assert config["docker"]["image"] == IMAGE, "image tag must match the pinned ray version"
    assert not {"head_image", "worker_image"} & set(config["docker"])
    setup = config["setup_commands"]
    torch_step = next(i for i, cmd in enumerate(setup) if "torch==" in cmd)
    project_step = next(i for i, cmd in enumerate(setup) if "pip install -q -e ~/cast-train" in cmd)
    assert makefile_torch_pin() in setup[torch_step]
    assert torch_step < project_step
    assert config["file_mounts"] == {"~/cast-train": "."}


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_gpu_workers_scale_from_zero_and_head_has_no_gpu(cloud):
    config = load(LAUNCHERS[cloud])
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert "guestAccelerators" not in head["node_config"]
    assert not re.match(r"[gp]\d", head["node_config"].get("InstanceType", "")), "head must be a CPU type"
    workers = worker_types(config)
    assert sum(t["max_workers"] for t in workers.values()) >= config["max_workers"] > 0
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] > 0, name
        shm = [opt for opt in node_type["docker"]["worker_run_options"] if opt.startswith("--shm-size=")]
        assert shm, f"{name}: /dev/shm size not set for the DataLoaders"
    start = " ".join(config["worker_start_ray_commands"])
    assert "--object-store-memory=" in start and "ulimit -n 65536" in start
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_aws_gpu_workers_are_spot_with_an_instance_profile():
    config = load(LAUNCHERS["aws"])
    for name, node_type in worker_types(config).items():
        node = node_type["node_config"]
        assert re.match(r"(g5|g6|g6e|p4d|p5)\.", node["InstanceType"]), name
        assert node["InstanceMarketOptions"] == {"MarketType": "spot"}, name
        profile = node["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", profile), name
    assert config["provider"]["cache_stopped_nodes"] is False


def test_gcp_gpu_workers_are_preemptible_and_terminate_on_host_maintenance():
    config = load(LAUNCHERS["gcp"])
    for name, node_type in worker_types(config).items():
        node = node_type["node_config"]
        gpus = sum(acc["acceleratorCount"] for acc in node["guestAccelerators"])
        assert node_type["resources"]["GPU"] == gpus > 0, name
        # The Compute API takes `scheduling` as one object; GPUs require TERMINATE.
        assert node["scheduling"] == {"onHostMaintenance": "TERMINATE", "automaticRestart": False,
                                      "preemptible": True}, name
        assert {"key": "install-nvidia-driver", "value": "True"} in node["metadata"]["items"]
        scopes = node["serviceAccounts"][0]["scopes"]
        assert "https://www.googleapis.com/auth/devstorage.read_write" in scopes
        assert any("nvidia-smi" in cmd for cmd in node_type["initialization_commands"])
    assert any("gcsfs==" in cmd for cmd in config["setup_commands"])


def test_no_cloud_keys_anywhere_in_cluster():
    key_patterns = [
        r"AKIA[0-9A-Z]{16}",  # AWS access key id
        r"aws_access_key_id",
        r"aws_secret_access_key",
        r"aws_session_token",
        r"BEGIN [A-Z ]*PRIVATE KEY",
        r'"private_key"',
        r"ssh_private_key",
    ]
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert len(files) >= 7
    for path in files:
        text = path.read_text()
        for pattern in key_patterns:
            assert not re.search(pattern, text, re.IGNORECASE), f"{path.relative_to(ROOT)}: {pattern}"


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_rsync_ships_code_only(cloud):
    excludes = load(LAUNCHERS[cloud])["rsync_exclude"]
    assert {".git", ".venv", "*.pth*", "*.tar"} <= set(excludes)
    # Top-level data folders are anchored: an unanchored "data" would drop the cast/data package.
    assert {"/data", "/shards", "/outputs", "/runs", "/demo_out"} <= set(excludes)
    assert not {"data", "data/", "shards", "outputs"} & set(excludes)


# ---------------------------------------------------------------- runtime_env.yaml (ray job submit)

CODE_FILES = {
    "cast/__init__.py",
    "cast/data/__init__.py",
    "cast/data/reader.py",
    "cast/models/cast.py",
    "jobs/pretrain.py",
    "jobs/configs/moco_cast_small_in1k.yaml",
    "cluster/runtime_env.yaml",
    "pyproject.toml",
}
NON_CODE_FILES = {
    ".git/config",
    ".venv/bin/python",
    "data/imagenet/n01440764/img.JPEG",
    "shards/train-000000.tar",
    "outputs/run/events.out",
    "runs/moco/checkpoint_000001/model.pt",
    "demo_out/seg.png",
    "weights/cast_small.pth",
    "weights/moco_cast_small.pth.tar",
    "cast/models/__pycache__/cast.cpython-311.pyc",
}


def uploaded_files(tmp_path: Path, excludes: list[str], gitignore: str | None = None) -> set[str]:
    """The files Ray's own packager puts in the working_dir zip for a checkout-like tree."""
    tree = tmp_path / "checkout"
    for rel in CODE_FILES | NON_CODE_FILES:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    if gitignore is not None:
        (tree / ".gitignore").write_text(gitignore)
    package = tmp_path / "working_dir.zip"
    create_package(str(tree), package, include_gitignore=gitignore is not None, excludes=excludes)
    with zipfile.ZipFile(package) as zf:
        return {name for name in zf.namelist() if not name.endswith("/")} - {".gitignore"}


def test_runtime_env_is_valid_and_ships_code_only(tmp_path):
    runtime_env = load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**runtime_env)  # Ray's own field and type checks (env_vars must be strings, ...)
    assert runtime_env["working_dir"] == "."
    assert runtime_env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    assert set(runtime_env) == {"working_dir", "excludes", "env_vars"}, "code only: no pip/conda here"
    assert uploaded_files(tmp_path, runtime_env["excludes"]) == CODE_FILES


def test_runtime_env_uploads_code_together_with_the_repository_gitignore(tmp_path):
    """`ray job submit` also applies the checkout's .gitignore (unless
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1): it must not drop a package such as cast/data."""
    excludes = load(CLUSTER / "runtime_env.yaml")["excludes"]
    uploaded = uploaded_files(tmp_path, excludes, gitignore=(ROOT / ".gitignore").read_text())
    assert uploaded == CODE_FILES, f"dropped by .gitignore: {sorted(CODE_FILES - uploaded)}"


def test_runtime_env_rejects_non_string_env_vars():
    runtime_env = load(CLUSTER / "runtime_env.yaml")
    runtime_env["env_vars"]["RAY_TRAIN_V2_ENABLED"] = 1
    with pytest.raises(TypeError):
        RuntimeEnv(**runtime_env)


# ---------------------------------------------------------------- KubeRay manifests


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


def pod_containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("name", ["raycluster", "rayjob-pretrain", "rayjob-sweep"])
def test_kuberay_manifest_structure(name):
    manifest = load(KUBERAY / f"{name}.yaml")
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == ("RayCluster" if name == "raycluster" else "RayJob")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    spec = cluster_spec(manifest)
    assert spec["rayVersion"] == ray.__version__
    account = load(KUBERAY / "serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount"
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+",
                        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])

    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        # KubeRay passes rayStartParams through as strings; a YAML int or bool breaks `ray start`.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod_containers(group):
            assert container["image"] == IMAGE
            assert container["resources"]["requests"] == container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
            assert container["lifecycle"]["preStop"]["exec"]["command"][-1] == "ray stop"
            assert makefile_torch_pin() in container["command"][0]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            assert not any("AWS_" in env["name"] for env in container.get("env", []))

    head = pod_containers(spec["headGroupSpec"])[0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265, 10001}
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"]
        assert int(pod_containers(group)[0]["resources"]["limits"]["nvidia.com/gpu"]) > 0
        tolerations = group["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


@pytest.mark.parametrize("name", sorted(RAYJOBS))
def test_rayjobs_share_the_raycluster_spec(name):
    assert cluster_spec(load(RAYJOBS[name])) == cluster_spec(load(KUBERAY / "raycluster.yaml"))


@pytest.mark.parametrize("name", sorted(RAYJOBS))
def test_rayjob_entrypoint_and_runtime_env(name):
    spec = load(RAYJOBS[name])["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[3] == "--config"
    module, config_path, overrides = argv[2], argv[4], argv[5:]
    assert module == f"jobs.{name}"
    assert re.fullmatch(r"jobs/configs/[a-z0-9_]+\.yaml", config_path)
    assert all(re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=\S+", o) for o in overrides), overrides
    assert_valid_job_command(argv)

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    # In K8s the working_dir must be remote: the code at one commit, not a local path.
    assert re.fullmatch(r"https://\S+/archive/\S+\.zip", runtime_env["working_dir"])
    assert runtime_env["env_vars"] == load(CLUSTER / "runtime_env.yaml")["env_vars"]
    head_command = pod_containers(spec["rayClusterSpec"]["headGroupSpec"])[0]["command"][0]
    assert runtime_env["working_dir"] in head_command, "code and dependencies from different commits"
