"""Cut the KubeRay CRD schemas down to the fields our manifests use, for offline validation in tests.

    python scripts/trim_crd_schema.py /path/to/kuberay/crds   # holds ray.io_rayjobs.yaml, ray.io_rayclusters.yaml

Every key of every RayJob and RayCluster that the overlays of docker/kuberay render (scripts/kustomize_render.py)
must exist in the full CRD (else this script fails, naming it); the trimmed schema keeps those fields with their
types, enums and patterns, and sets ``additionalProperties: false`` on every object, so the tests reject unknown
fields strictly. Rerun it after adding a field to a manifest.
"""

import json
import sys
from pathlib import Path

import yaml
from kustomize_render import render

ROOT = Path(__file__).resolve().parents[1]
CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def prune(schema: dict, values: list, where: str) -> dict:
    """``schema`` restricted to what ``values`` (instances at this place) use."""
    node = {k: v for k, v in schema.items() if k not in ("properties", "items", "description")}
    if "properties" in schema:  # objects without properties (metadata, free-form maps) stay open
        properties = schema.get("properties", {})
        used = sorted({key for value in values if isinstance(value, dict) for key in value})
        unknown = [key for key in used if key not in properties]
        if unknown:
            raise SystemExit(f"{where}: {unknown} not in the CRD schema")
        node["properties"] = {key: prune(properties[key], [v[key] for v in values if isinstance(v, dict) and key in v],
                                         f"{where}.{key}") for key in used}
        node["additionalProperties"] = False
        # the API server fills a defaulted field before it validates: required only where there is no default
        required = [key for key in schema.get("required", []) if "default" not in properties.get(key, {})]
        node.pop("required", None)
        if required:
            node["required"] = required
    if "items" in schema:
        node["items"] = prune(schema["items"], [item for value in values if isinstance(value, list) for item in value],
                              f"{where}[]")
    return node


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    crd_dir = Path(sys.argv[1])
    overlays = sorted(p.parent for p in (ROOT / "docker" / "kuberay" / "overlays").glob("*/kustomization.yaml"))
    manifests = [obj for overlay in overlays for obj in render(overlay)]
    for kind, filename in CRDS.items():
        crd = yaml.load((crd_dir / filename).read_text(), Loader=yaml.CSafeLoader)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        instances = [m for m in manifests if m["kind"] == kind]
        trimmed = prune(version["schema"]["openAPIV3Schema"], instances, kind)
        out = ROOT / "tests" / "schemas" / f"{kind.lower()}.schema.json"
        out.write_text(json.dumps(trimmed, indent=1, sort_keys=True) + "\n")
        print(f"{out.relative_to(ROOT)}: {len(instances)} rendered objects, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
