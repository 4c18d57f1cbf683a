"""The cluster manifests under cluster/ have what Ray and KubeRay need, and every job under jobs/ validates.

No cluster is started here: the launcher YAML goes through Ray's own ``prepare_config`` +
``validate_config`` (the JSON schema ``ray up`` uses), the Kubernetes manifests are checked field by field.
"""

import shlex
from pathlib import Path

import pytest
import yaml

from props_ray.cli import main
from props_ray.config import load_job

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
JOBS = REPO / "jobs"
SHARED_MOUNT = "/mnt/shared"
PAPER_JOBS = {
    "pythia-1b-hh-rlhf.yaml": ("EleutherAI/pythia-1b", "Anthropic/hh-rlhf", "hh_rlhf",
                               ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "gpt2-large-truthy-dpo.yaml": ("gpt2-large", "jondurbin/truthy-dpo-v0.1", "preference",
                                   ["c_attn", "c_proj", "c_fc"]),
    "gpt2-medium-alpaca-eval.yaml": ("gpt2-medium", None, "alpaca_eval", ["c_attn", "c_proj", "c_fc"]),
}


def _yaml_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _docs() -> list[tuple[Path, dict]]:
    out = []
    for path in _yaml_files(CLUSTER):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert isinstance(doc, dict), f"{path}: a YAML document that is not a mapping"
                out.append((path, doc))
    return out


def _k8s(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _docs() if d.get("kind") == kind]


def _one(kind: str) -> dict:
    found = _k8s(kind)
    assert len(found) == 1, f"expected one {kind} under cluster/, found {[str(p) for p, _ in found]}"
    return found[0][1]


def _pod_specs(rc: dict) -> list[tuple[str, dict]]:
    spec = rc["spec"]
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return out


def _shared_claim() -> str:
    pvcs = [d for _, d in _k8s("PersistentVolumeClaim") if "ReadWriteMany" in d["spec"].get("accessModes", [])]
    assert len(pvcs) == 1, "expected exactly one ReadWriteMany PVC (the shared volume)"
    return pvcs[0]["metadata"]["name"]


# -- every file -------------------------------------------------------------------

def test_every_cluster_yaml_parses_and_is_a_known_manifest():
    files = _yaml_files(CLUSTER)
    assert {p.relative_to(CLUSTER).as_posix() for p in files} >= {
        "aws-gpu.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/storage.yaml",
        "kuberay/mlflow.yaml"}
    kinds = []
    for path, doc in _docs():
        if "available_node_types" in doc:
            kinds.append("launcher")
            continue
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: neither a launcher config nor a k8s object"
        assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without metadata.name"
        kinds.append(doc["kind"])
    for k in ("launcher", "RayCluster", "RayJob", "PersistentVolumeClaim", "Deployment", "Service"):
        assert k in kinds, f"no {k} under cluster/"


# -- Ray cluster launcher ---------------------------------------------------------------

@pytest.fixture(scope="module")
def launcher():
    docs = [(p, d) for p, d in _docs() if "available_node_types" in d]
    assert len(docs) == 1
    return docs[0][1]


def test_launcher_passes_rays_own_schema(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(dict(launcher)))  # raises jsonschema.ValidationError on a bad field


def test_launcher_required_fields(launcher):
    c = launcher
    assert c["cluster_name"] == "props-ray-gpu"
    assert c["provider"]["type"] == "aws" and c["provider"]["region"]
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    assert isinstance(c["max_workers"], int) and c["max_workers"] >= 1
    for name, t in types.items():
        assert {"resources", "node_config", "min_workers", "max_workers"} <= set(t), name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= c["max_workers"], name
        assert t["node_config"]["InstanceType"], name
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu and c["head_node_type"] not in gpu
    assert any(t["node_config"]["InstanceType"] == "g5.xlarge" and t["resources"]["GPU"] == 1 for t in gpu.values())


def test_launcher_installs_props_ray_and_runs_mlflow_on_the_head(launcher):
    c = launcher
    assert c["file_mounts"]["/home/ray/props-ray"] == "."
    assert ".venv" in c["rsync_exclude"] and ".git" in c["rsync_exclude"]
    assert any("pip install" in cmd and "-c constraints.txt ." in cmd for cmd in c["setup_commands"])
    head_cmds = " ".join(c["head_start_ray_commands"])
    assert "ray start --head" in head_cmds and "--dashboard-host=0.0.0.0" in head_cmds
    mlflow = [cmd for cmd in c["head_start_ray_commands"] if "mlflow server" in cmd]
    assert len(mlflow) == 1
    args = shlex.split(mlflow[0].rsplit("mlflow server", 1)[1].split(">", 1)[0])
    opts = dict(zip(args[::2], args[1::2]))
    assert opts["--host"] == "0.0.0.0" and opts["--port"] == "5000"
    assert opts["--backend-store-uri"] == "sqlite:////home/ray/mlflow.db"
    assert opts["--artifacts-destination"].startswith(SHARED_MOUNT + "/")
    # the shared mount exists on the host and is bind-mounted into every container at the same path
    assert any(SHARED_MOUNT in cmd and "mount" in cmd for cmd in c["initialization_commands"])
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in c["docker"]["run_options"]
    assert any("ray start --address=$RAY_HEAD_IP:6379" in cmd for cmd in c["worker_start_ray_commands"])


# -- KubeRay --------------------------------------------------------------------------------

def test_raycluster_head_and_gpu_workers():
    rc = _one("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    head = rc["spec"]["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values must be strings"
    head_c = head["template"]["spec"]["containers"]
    assert head_c and all(c.get("image") for c in head_c)
    assert "nvidia.com/gpu" not in head_c[0].get("resources", {}).get("limits", {})
    groups = rc["spec"]["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"]
        assert isinstance(g["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert all(c.get("image") for c in g["template"]["spec"]["containers"])
    gpu_groups = [g for g in groups
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    for g in gpu_groups:
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1
        # extended resources: a request, if given, must equal the limit
        assert res.get("requests", {}).get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == \
            res["limits"]["nvidia.com/gpu"]


def test_shared_volume_mounted_at_the_same_path_on_every_pod():
    claim = _shared_claim()
    mount_paths = {}
    for group, pod in _pod_specs(_one("RayCluster")):
        vols = [v["name"] for v in pod.get("volumes", [])
                if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
        assert len(vols) == 1, f"{group}: the shared PVC {claim} is not a volume"
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] == vols[0]]
        assert mounts, f"{group}: the shared volume is not mounted"
        mount_paths[group] = mounts[0]
    assert set(mount_paths.values()) == {SHARED_MOUNT}, mount_paths


def test_pvc_is_read_write_many():
    pvc = [d for _, d in _k8s("PersistentVolumeClaim") if d["metadata"]["name"] == _shared_claim()][0]
    assert pvc["apiVersion"] == "v1"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"]


def test_rayjob_runs_a_job_file_on_the_shared_volume():
    rj = _one("RayJob")
    assert rj["apiVersion"] == "ray.io/v1"
    spec = rj["spec"]
    entry = spec["entrypoint"]
    assert "props-ray run" in entry
    assert f"--set output_dir={SHARED_MOUNT}/runs" in entry
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    if "clusterSelector" in spec:
        assert spec["clusterSelector"]["ray.io/cluster"] == _one("RayCluster")["metadata"]["name"]
    args = shlex.split(entry.split("props-ray run", 1)[1])
    job = REPO / args[0]
    assert job.parent == JOBS and job.is_file(), f"the RayJob runs {args[0]}, which is not a file under jobs/"
    cfg = load_job(job, args[2::2] if args[1:2] == ["--set"] else [])
    assert cfg.output_dir == f"{SHARED_MOUNT}/runs"


def test_mlflow_server_deployment_and_service():
    dep, svc = _one("Deployment"), _one("Service")
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    c = pod["spec"]["containers"][0]
    cmd = c.get("command", []) + c.get("args", [])
    assert cmd[:2] == ["mlflow", "server"]
    assert "--host=0.0.0.0" in cmd and "--port=5000" in cmd
    assert any(a.startswith(f"--artifacts-destination={SHARED_MOUNT}/") for a in cmd)
    assert [p["port"] for p in svc["spec"]["ports"]] == [5000]
    # the Ray pods track to this Service
    uri = f"http://{svc['metadata']['name']}:5000"
    for group, spec in _pod_specs(_one("RayCluster")):
        env = {e["name"]: e.get("value") for e in spec["containers"][0].get("env", [])}
        assert env.get("MLFLOW_TRACKING_URI") == uri, group


def test_readme_gives_the_commands():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("ray up", "ray job submit --address http://HEAD:8265 --working-dir .", "props-ray submit",
                   "kubectl apply -f cluster/kuberay/storage.yaml", "kubectl port-forward svc/props-ray-head-svc",
                   "kubectl port-forward svc/mlflow 5000:5000"):
        assert needle in text, needle


# -- jobs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", _yaml_files(JOBS), ids=lambda p: p.name)
def test_every_job_validates_without_the_hub(path, monkeypatch, capsys):
    """The config of every job (its data lives on the hub or a cluster volume: --config-only)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["validate", "--config-only", str(path)]) == 0
    assert "valid job" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(PAPER_JOBS))
def test_paper_jobs_are_set_up_for_gpus(name):
    model, source, fmt, targets = PAPER_JOBS[name]
    cfg = load_job(JOBS / name)
    assert cfg.model.name == model
    if source:
        assert cfg.data.source == source
    assert cfg.data.format == fmt
    assert cfg.model.lora.enabled and cfg.model.lora.target_modules == targets
    assert cfg.model.dtype == "bfloat16"
    assert not cfg.model.gradient_checkpointing  # refused with dpsgd, which every paper job runs
    assert cfg.train.use_gpu and cfg.train.num_workers >= 2
    assert cfg.privacy.epsilons == [0.1, 0.5, 1.0, 2.0]
    assert cfg.stages == 3
    assert cfg.output_dir == f"{SHARED_MOUNT}/runs"
    assert cfg.data.max_prompt_length == 256 and cfg.data.max_response_length == 256
    assert cfg.eval.judge not in ("oracle", "") and cfg.eval.max_new_tokens
    assert sorted(m.display_name for m in cfg.methods) == \
        ["dpsgd", "nonprivate", "props-mle", "props-posterior", "rr"]
    assert len(cfg.trials()) == 1 + 4 * 4


def test_offline_site_bundles_the_pins_the_target_lacks(tmp_path):
    """cluster/offline-site.sh: every pin of constraints.txt the target's package list lacks, at its pinned
    version, and nothing the target has (however pip spelt it) or a batch job never loads."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-").replace(".", "-")] = version.strip()
    have = tmp_path / "have.txt"  # `pip list` output, with its header, mixed spellings
    have.write_text("Package    Version\n---------- -------\ntorch      2.11.0\nTransformers 5.17.0\n"
                    "huggingface_hub 1.33.0\nnumpy==2.5.2\npyarrow\n")
    done = subprocess.run(["bash", "cluster/offline-site.sh"], cwd=root, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HAVE": str(have), "LIST_ONLY": "1"})
    assert done.returncode == 0, done.stderr
    listed = {}
    for line in done.stdout.split():
        name, version = line.split("==")
        listed[name.lower().replace("_", "-").replace(".", "-")] = version
    assert {"torch", "transformers", "huggingface-hub", "numpy", "pyarrow"}.isdisjoint(listed)
    assert {"trl", "virtualenv", "py-spy"}.isdisjoint(listed)
    for name in ("ray", "mlflow", "opacus", "pydantic", "peft", "datasets", "scipy"):
        assert listed[name] == pins[name], name
    assert set(listed) == set(pins) - {"torch", "transformers", "huggingface-hub", "numpy", "pyarrow",
                                       "trl", "virtualenv", "py-spy"}
