"""cluster/: the launcher configs validate against Ray's own schema and keep the project's rules
(CPU head with no Ray resources, GPU groups from zero, spot only for workers, image = installed
ray, token auth, dashboard on 127.0.0.1); the KubeRay manifests validate against the CRDs KubeRay
publishes and carry what a GPU cluster needs;
and cluster/local_cluster.sh really starts a head + 2 workers and then ends every process it
started, and nothing else.

The real-cluster tests are marked ``cluster`` (they run by default; select them alone with ``-m cluster``).
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from mlflow import MlflowClient
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SCRIPT = CLUSTER / "local_cluster.sh"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"


def ray_version() -> str:
    import ray

    return ray.__version__


def load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def requirements() -> list[str]:
    return (CLUSTER / "requirements.txt").read_text().split()


def image_pattern(kind: str) -> str:
    """rayproject/ray:<installed ray>-<this Python>-<cpu | gpu | cuXXX>."""
    platform = "cpu" if kind == "cpu" else r"(gpu|cu\d+)"
    return rf"^rayproject/ray:{re.escape(ray_version())}-{PY_TAG}-{platform}$"


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher (ray up)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_validates_against_the_schema_ray_ships(name):
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = load(name)
    jsonschema.validate(config, schema)
    # What `ray up` does before it touches a cloud: fill in the provider defaults, validate again
    # (head_node_type among the node types, sum of min_workers within max_workers, ...).
    validate_config(prepare_config(copy.deepcopy(config)))


def node_types(config: dict) -> tuple[str, dict, dict]:
    types = config["available_node_types"]
    head = config["head_node_type"]
    return head, types[head], {k: v for k, v in types.items() if k != head}


def is_spot(node_config: dict) -> bool:
    aws = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    gcp = scheduling.get("preemptible") is True or scheduling.get("provisioningModel") == "SPOT"
    return aws or gcp


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_head_runs_no_tasks_and_gpu_groups_scale_from_zero(name):
    config = load(name)
    _, head, workers = node_types(config)
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    assert not is_spot(head["node_config"]), "the head must not be spot/preemptible"

    gpu_groups = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    assert gpu_groups, "a GPU worker node type"
    for group in gpu_groups.values():
        assert group["min_workers"] == 0
        assert group["max_workers"] >= 1
        assert is_spot(group["node_config"]), "GPU workers run on spot/preemptible capacity"
    assert all(w.get("min_workers", 0) == 0 for w in workers.values())
    assert config["max_workers"] >= max(w["max_workers"] for w in workers.values())
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_images_are_pinned_to_the_installed_ray(name):
    docker = load(name)["docker"]
    assert re.match(image_pattern("gpu"), docker["image"]), docker["image"]
    assert re.match(image_pattern("cpu"), docker["head_image"]), docker["head_image"]
    for node_type in load(name)["available_node_types"].values():
        if "worker_image" in node_type.get("docker", {}):
            assert re.match(image_pattern("any"), node_type["docker"]["worker_image"])


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_keeps_token_auth_and_the_dashboard_private(name):
    config = load(name)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for remote, local in config["file_mounts"].items():
        if not local.startswith("~"):
            assert (ROOT / local).is_file(), f"file_mounts {remote}: {local} (relative to the repo root)"
    head_start = " ".join(config["head_start_ray_commands"])
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        starts = [c for c in commands if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in yaml.safe_dump(config)
    assert all("RAY_AUTH_MODE=disabled" not in c for c in config["setup_commands"])


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_installs_only_pinned_dependencies_never_the_code(name):
    config = load(name)
    setup = " ".join(config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"])
    assert "pip install --no-cache-dir -r ~/metaray-requirements.txt" in setup
    for forbidden in ("git clone", "pip install -e", "pip install .", "metaray"):
        assert forbidden not in setup.replace("metaray-requirements", ""), forbidden


def test_documented_job_runtime_env_is_valid(monkeypatch):
    """`ray job submit --runtime-env-json '{"pip": "cluster/requirements.txt", ...}'` from the repo root."""
    from ray.runtime_env import RuntimeEnv

    monkeypatch.chdir(ROOT)
    env = RuntimeEnv(pip="cluster/requirements.txt", env_vars={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert env.to_dict()["pip"]["packages"] == requirements()


def test_requirements_pin_every_project_dependency_but_ray():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {canonicalize_name(Requirement(d).name): Requirement(d).specifier for d in project}
    pins = [Requirement(line) for line in requirements()]
    assert all(len(p.specifier) == 1 and next(iter(p.specifier)).operator == "==" for p in pins), pins
    pinned = {canonicalize_name(p.name): next(iter(p.specifier)).version for p in pins}
    assert "ray" not in pinned, "ray comes with the image, at the image's version"
    assert set(pinned) == set(wanted) - {"ray"}
    for name, version in pinned.items():
        assert wanted[name].contains(version), f"{name}=={version} outside pyproject's {wanted[name]}"


# ---------------------------------------------------------------------------------------------
# KubeRay: the ray.io/v1 CRDs the operator publishes (tests/data/kuberay, see its NOTICE), read as
# `kubectl apply` does with its default strict field validation: an unknown field is an error. The
# CRDs' CEL rules (x-kubernetes-validations) run only in an API server and are not checked here.

CRDS = Path(__file__).parent / "data" / "kuberay"


def strict(schema):
    """``schema`` with unknown fields rejected wherever the API server's strict field validation rejects them:
    objects that list their properties, unless marked x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    """A validator for a whole ``kind`` document from its CRD's ray.io/v1 OpenAPI schema."""
    crd = json.loads(gzip.decompress((CRDS / f"ray.io_{kind.lower()}s.json.gz").read_bytes()))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(strict(v1["schema"]["openAPIV3Schema"]))


def manifest(kind: str, path: str) -> dict:
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert doc["metadata"]["name"]
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(kind).iter_errors(doc)]
    assert not errors, f"{path} is not a valid {kind}:\n" + "\n".join(errors)
    return doc


def _worker_limits(doc: dict) -> dict:
    return doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize("kind, edit, where", [
    pytest.param("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplica=0),
                 "spec.workerGroupSpecs.0", id="misspelt-field"),
    pytest.param("RayCluster", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
                 "spec.headGroupSpec.rayStartParams.num-cpus", id="rayStartParams-not-a-string"),
    pytest.param("RayCluster", lambda d: _worker_limits(d).update(memory="32 GiB"),
                 "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.memory", id="not-a-quantity"),
    pytest.param("RayJob", lambda d: d["spec"].update(shutdownAfterJobFinishes="true"),
                 "spec.shutdownAfterJobFinishes", id="string-for-boolean"),
    pytest.param("RayJob", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].pop("template"),
                 "spec.rayClusterSpec.headGroupSpec", id="required-field-missing"),
])
def test_the_crd_schema_rejects_broken_manifests(kind, edit, where):
    """The check above can fail: each edit breaks one rule of the real schema, reported at its path."""
    doc = load(f"kuberay/{kind.lower()}.yaml")
    edit(doc)
    paths = {".".join(map(str, e.absolute_path)) for e in crd_validator(kind).iter_errors(doc)}
    assert paths == {where}, paths


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray_version()
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    (head_container,) = head["template"]["spec"]["containers"]
    assert re.match(image_pattern("cpu"), head_container["image"])
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]

    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "a GPU worker group"
    for group in gpu_groups:
        assert group["minReplicas"] == 0
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"] and group["maxReplicas"] >= 1
        for container in group["template"]["spec"]["containers"]:
            assert re.match(image_pattern("gpu"), container["image"])
            resources = container["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]


def test_kuberay_raycluster():
    doc = manifest("RayCluster", "kuberay/raycluster.yaml")
    check_ray_cluster_spec(doc["spec"])
    assert doc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_kuberay_rayjob():
    from ray.runtime_env import RuntimeEnv

    from orchestrator.config import load_config

    doc = manifest("RayJob", "kuberay/rayjob.yaml")
    spec = doc["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "pip", "env_vars"} and runtime_env["working_dir"]
    assert runtime_env["pip"] == requirements(), "keep the RayJob's pip list equal to cluster/requirements.txt"
    RuntimeEnv(**runtime_env)  # Ray's own validation (URI form, pip list)

    # The entrypoint is a valid metaray command: an existing config, overrides the config accepts.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "orchestrator.cli", "train"]
    config_path, rest = argv[4], argv[5:]
    overrides = [rest[i + 1] for i in range(0, len(rest), 2) if rest[i] == "--set"]
    assert len(overrides) * 2 == len(rest)
    cfg = load_config(ROOT / config_path, overrides)
    assert cfg.workers.address == "auto" and cfg.workers.mode == "ray"


# ---------------------------------------------------------------------------------------------
# cluster/local_cluster.sh: argument checks (no Ray started)


def run_script(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else script_env())


def script_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's `ray`
    return {**env, **extra}


@pytest.mark.parametrize("args, message", [
    (["start", "--workers", "0"], "--workers must be 1..200, got '0'"),
    (["start", "--cpus-per-worker", "half"], "--cpus-per-worker must be a whole number >= 1, got 'half'"),
    (["start", "--head-ip", "127.0.0.1"], "--head-ip must be a loopback address other than 127.0.0.1"),
    (["start", "--frobnicate", "1"], "unknown option '--frobnicate'"),
    (["restart"], "unknown command 'restart'"),
])
def test_local_cluster_rejects_bad_arguments(tmp_path, args, message):
    result = run_script(*args, "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2
    assert message in result.stderr


def test_local_cluster_without_a_cluster(tmp_path):
    state = ["--state-dir", str(tmp_path / "state")]
    assert run_script("status", *state).returncode == 1
    stop = run_script("stop", *state)
    assert stop.returncode == 0 and "No local cluster to stop" in stop.stdout
    assert run_script("address", *state).returncode == 1


# ---------------------------------------------------------------------------------------------
# cluster/local_cluster.sh: a real head + 2 workers

PROBE = """
import json, logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR)
nodes = [{"alive": n["Alive"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]} for n in ray.nodes()]

@ray.remote(num_cpus=1)
def where():
    return ray.util.get_node_ip_address()

placed = {i: ray.get(where.options(resources={f"node_{i}": 0.01}).remote(), timeout=120) for i in (1, 2)}
print(json.dumps({"nodes": nodes, "placed": placed}))
"""


def read_state(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def processes_of(state: dict[str, str]) -> dict[int, str]:
    """Live processes of the cluster: {pid: comm}. Same rule as the script: our marker in the
    environment, or a session of one of the `ray start`s. Zombies (already dead) are left out."""
    marker = f"METARAY_LOCAL_CLUSTER={state['id']}".encode()
    sessions = set(state["sids"].split())
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            if fields[0] == "Z":
                continue
            ours = fields[3] in sessions
            if not ours:
                ours = marker in (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue  # gone, or not ours to read
        if ours:
            found[int(proc.name)] = stat[stat.index("(") + 1:stat.rindex(")")]
    return found


@pytest.mark.slow  # three real nodes; the multi-node tests run the same cluster in CI
@pytest.mark.cluster
@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux: 127.0.0.x loopback addresses, /proc, setsid")
def test_local_cluster_runs_three_nodes_and_stops_every_process_it_started(tmp_path):
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    state_dir = tmp_path / "state"
    state_opt = ["--state-dir", str(state_dir)]
    started: dict[int, str] = {}
    state: dict[str, str] = {}
    try:
        start = run_script("start", "--workers", "2", "--cpus-per-worker", "1", "--token-file", str(token),
                           *state_opt, timeout=240)
        assert start.returncode == 0, start.stdout + start.stderr
        state = read_state(state_dir / "cluster.env")
        address = state["address"]
        assert re.fullmatch(r"127\.0\.0\.2:\d+", address)
        assert f"address:  {address}" in start.stdout
        assert run_script("address", *state_opt).stdout.strip() == address

        again = run_script("start", *state_opt)
        assert again.returncode == 1 and "already running" in again.stderr

        client_env = script_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        probe = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True, text=True,
                               timeout=180, env=client_env)
        assert probe.returncode == 0, probe.stderr[-3000:]
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
        nodes = {n["ip"]: n for n in seen["nodes"]}
        assert sorted(nodes) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        assert all(n["alive"] for n in nodes.values())
        head = nodes["127.0.0.2"]["resources"]
        assert head.get("CPU", 0) == 0 and head.get("GPU", 0) == 0 and "node:__internal_head__" in head
        for i, ip in ((1, "127.0.0.3"), (2, "127.0.0.4")):
            assert nodes[ip]["resources"]["CPU"] == 1 and nodes[ip]["resources"][f"node_{i}"] == 1
            assert seen["placed"][str(i)] == ip  # node_<i> places work on worker node i

        status = run_script("status", *state_opt)
        assert status.returncode == 0 and address in status.stdout

        started = processes_of(state)
        names = sorted(started.values())
        assert names.count("raylet") == 3 and names.count("gcs_server") == 1, names
        # The script's own record of what it started is a subset of what the rule finds now.
        assert {int(p) for p in state["pids"].split()} <= set(started)
    finally:
        stop = run_script("stop", *state_opt, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert processes_of(state) == {}, "processes of the cluster survived 'stop'"
    assert not (state_dir / "cluster.env").exists()
    assert not Path(state["ray_temp_dir"]).exists()
    assert run_script("status", *state_opt).returncode == 1


@pytest.mark.slow  # a real cluster with the dashboard's job API; SIGTERM on Ray is in CI (test_default_path)
@pytest.mark.cluster
@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux: 127.0.0.x loopback addresses, /proc, setsid")
def test_ray_job_stop_stops_the_run_at_a_step_boundary(tmp_path, mlflow_store):
    """`ray job submit` a training run to cluster/local_cluster.sh, then `ray job stop` it: Ray sends SIGTERM (and
    SIGKILL after RAY_JOB_STOP_WAIT_TIME_S, which the script sets to 120 s): the run checkpoints at the end of its
    step and ends its MLflow run KILLED."""
    import ray._private.utils

    if ray._private.utils.get_dashboard_dependency_error() is not None:
        pytest.skip("the job API needs the full Ray install: pip install 'ray[default]'")
    from orchestrator.run import checkpoint

    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    state_opt = ["--state-dir", str(tmp_path / "state")]
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "job", "dir": str(tmp_path / "runs"), "checkpoint_every": 100000, "log_every": 1},
        "task": {"k_shot": 5, "query": 5}, "model": {"hidden": [16, 16]}, "outer": {"meta_batch_size": 8,
                                                                                       "steps": 100000},
        "workers": {"mode": "ray", "num_workers": 2, "address": "auto"},
        "tracking": {"uri": mlflow_store, "experiment": "ray-job", "system_metrics": False}}))
    env = script_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    try:
        start = run_script("start", "--workers", "2", "--cpus-per-worker", "1", "--dashboard", "--token-file",
                           str(token), *state_opt, timeout=240)
        assert start.returncode == 0, start.stdout + start.stderr
        api = f"http://127.0.0.1:{read_state(tmp_path / 'state' / 'cluster.env')['dashboard_port']}"
        ray_bin = str(Path(sys.executable).parent / "ray")
        submit = subprocess.run([ray_bin, "job", "submit", "--address", api, "--no-wait", "--submission-id",
                                 "metaray-stop", "--", sys.executable, "-m", "orchestrator.cli", "train", str(config)],
                                capture_output=True, text=True, timeout=120, env=env)
        assert submit.returncode == 0, submit.stdout + submit.stderr

        def logs() -> str:
            return subprocess.run([ray_bin, "job", "logs", "--address", api, "metaray-stop"], capture_output=True,
                                  text=True, timeout=60, env=env).stdout

        deadline = time.monotonic() + 300
        while "step 3/" not in logs() and time.monotonic() < deadline:
            time.sleep(1)
        stop = subprocess.run([ray_bin, "job", "stop", "--address", api, "metaray-stop"], capture_output=True,
                              text=True, timeout=180, env=env)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        out = logs()
        step = checkpoint.load(tmp_path / "runs" / "job").step
        assert f"interrupted: checkpoint at step {step}" in out and "stopped by SIGTERM" in out, out[-3000:]
        client = MlflowClient(mlflow_store)
        (run,) = client.search_runs([client.get_experiment_by_name("ray-job").experiment_id])
        assert run.info.status == "KILLED"
    finally:
        run_script("stop", *state_opt, timeout=120)
