"""Render a kustomization without kustomize: the subset docker/kuberay uses, so the tests check what
``kubectl apply -k`` applies, on machines without kubectl.

    python scripts/kustomize_render.py docker/kuberay/overlays/gpu   # prints what `kubectl kustomize` prints

Supported: ``resources`` (YAML files under the kustomization, and kustomization directories), ``configMapGenerator``
(``files``; ``behavior`` create, merge or replace) with ``generatorOptions`` (``labels``, and
``disableNameSuffixHash``, which must be true: kustomize would add a hash to the ConfigMap's name but not rename the
references inside a RayJob or RayCluster, whose fields it does not know), ``patches`` (JSON 6902 add, replace and
remove; inline or from a file; the target by kind and optionally name) and ``images`` (``newName``, ``newTag``,
``digest``, in every ``containers`` and ``initContainers`` list at any depth, as kustomize does for custom
resources). Anything else is an error rather than left unrendered. tests/unit/test_deploy.py compares the output with
``kubectl kustomize`` where kubectl is installed.
"""

import copy
import sys
from pathlib import Path

import yaml

FIELDS = {"apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions", "patches", "images"}


class KustomizeError(Exception):
    pass


def render(directory: str | Path) -> list[dict]:
    """The objects the kustomization in ``directory`` builds."""
    directory = Path(directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    check_fields(kustomization, FIELDS, directory / "kustomization.yaml")
    objects = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += render(path)
        else:  # kustomize loads files from the kustomization's directory and below only
            objects += [doc for doc in yaml.safe_load_all(inside(directory, entry).read_text()) if doc]
    ids = [(o["kind"], o["metadata"]["name"]) for o in objects]
    if duplicated := {i for i in ids if ids.count(i) > 1}:
        raise KustomizeError(f"{directory}: {sorted(duplicated)} defined more than once")
    generate_config_maps(directory, kustomization, objects)
    for patch in kustomization.get("patches", []):
        apply_patch(directory, patch, objects)
    for image in kustomization.get("images", []):
        check_fields(image, {"name", "newName", "newTag", "digest"}, f"{directory}: images")
        set_image(objects, image)
    return objects


def check_fields(mapping: dict, known: set, where) -> None:
    if unknown := set(mapping) - known:
        raise KustomizeError(f"{where}: {sorted(unknown)} not supported by this renderer")


def inside(directory: Path, entry: str) -> Path:
    path = (directory / entry).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise KustomizeError(f"{directory}: {entry} is outside the kustomization's directory (kustomize refuses it)")
    return path


def generate_config_maps(directory: Path, kustomization: dict, objects: list[dict]) -> None:
    generators = kustomization.get("configMapGenerator", [])
    options = kustomization.get("generatorOptions", {})
    check_fields(options, {"disableNameSuffixHash", "labels"}, f"{directory}: generatorOptions")
    if generators and options.get("disableNameSuffixHash") is not True:
        raise KustomizeError(f"{directory}: set generatorOptions.disableNameSuffixHash: true (a hashed name would "
                             "not reach the RayJob's and RayCluster's references)")
    for generator in generators:
        check_fields(generator, {"name", "behavior", "files"}, f"{directory}: configMapGenerator")
        name, behavior = generator["name"], generator.get("behavior", "create")
        data = {}
        for entry in generator.get("files", []):
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = inside(directory, path).read_text()
        existing = next((o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name), None)
        if behavior == "create":
            if existing:
                raise KustomizeError(f"{directory}: ConfigMap {name} exists; use behavior merge or replace")
            metadata = {"name": name} | ({"labels": dict(options["labels"])} if "labels" in options else {})
            objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
        elif behavior in ("merge", "replace"):
            if not existing:
                raise KustomizeError(f"{directory}: no ConfigMap {name} to {behavior}")
            if "labels" in options:
                existing["metadata"]["labels"] = existing["metadata"].get("labels", {}) | options["labels"]
            existing["data"] = (existing.get("data", {}) if behavior == "merge" else {}) | data
        else:
            raise KustomizeError(f"{directory}: behavior {behavior!r} of ConfigMap {name}")


def apply_patch(directory: Path, patch: dict, objects: list[dict]) -> None:
    check_fields(patch, {"target", "patch", "path"}, f"{directory}: patches")
    target = patch["target"]
    check_fields(target, {"kind", "name"}, f"{directory}: patch target")
    operations = yaml.safe_load(patch["patch"] if "patch" in patch else inside(directory, patch["path"]).read_text())
    if not isinstance(operations, list):
        raise KustomizeError(f"{directory}: only JSON 6902 patches (a list of operations) are supported")
    targets = [o for o in objects if o["kind"] == target["kind"]
               and target.get("name", o["metadata"]["name"]) == o["metadata"]["name"]]
    if not targets:
        raise KustomizeError(f"{directory}: no object matches the patch target {target}")
    for obj in targets:
        for operation in operations:
            try:
                apply_operation(obj, operation)
            except (KeyError, IndexError, ValueError, TypeError) as error:
                raise KustomizeError(f"{directory}: {operation} on {obj['kind']} {obj['metadata']['name']}: "
                                     f"{error!r}") from None


def apply_operation(document: dict, operation: dict) -> None:
    """One JSON 6902 operation: add, replace or remove."""
    op = operation["op"]
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
    node = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    value = copy.deepcopy(operation.get("value"))
    if isinstance(node, list):
        index = len(node) if last == "-" and op == "add" else int(last)
        if op == "add":
            node.insert(index, value)
        elif op == "replace":
            node[index] = value
        elif op == "remove":
            del node[index]
        else:
            raise ValueError(f"op {op!r} not supported")
    elif op == "add" or (op == "replace" and last in node):
        node[last] = value
    elif op == "remove":
        del node[last]
    else:
        raise ValueError(f"op {op!r} not supported" if op != "replace" else f"no {last!r} to replace")


def set_image(node, image: dict) -> None:
    """Rewrite the image of every container named ``image["name"]``, in any containers or initContainers list."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        container["image"] = new_reference(container["image"], image)
            set_image(value, image)
    elif isinstance(node, list):
        for item in node:
            set_image(item, image)


def new_reference(reference: str, image: dict) -> str:
    name, _, digest = reference.partition("@")
    tag = ""
    if name.rfind(":") > name.rfind("/"):  # a tag, not a registry's port
        name, tag = name.rsplit(":", 1)
    if name != image["name"]:
        return reference
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


if __name__ == "__main__":
    print(yaml.safe_dump_all(render(sys.argv[1]), sort_keys=False), end="")
