"""Render the kustomize overlays and validate every object offline, as strictly as the API server would.

    python k8s/validate.py                      # every kustomization under k8s/overlays
    python k8s/validate.py k8s/overlays/prod    # one

Rendering is `kubectl kustomize DIR` (Debian's `kubernetes-client` package gives kubectl; `$KUBECTL` picks
another binary). Then each object is checked against a schema:

- KubeRay custom resources (RayCluster, RayJob, RayService) against the `openAPIV3Schema` of their CRD in
  `../shared/k8s-crds/` (`$RP_K8S_CRDS` overrides), made strict as the API server's strict field validation
  is: every object schema that neither lists `additionalProperties` nor says
  `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`, so an unknown or misspelt field
  fails. `nullable`, the `int32`/`int64` formats and the uniqueness that `x-kubernetes-list-type: map | set`
  demands are checked too; a CEL rule (`x-kubernetes-validations`) cannot be evaluated offline, so a manifest
  that reaches one fails with a note to check it by hand rather than passing unchecked. A custom resource's
  own `metadata` (an untyped object in every CRD) is checked against Kubernetes' ObjectMeta.
- Everything else against the strict JSON schemas of Kubernetes `KUBERNETES_VERSION`, shipped by the
  `kubernetes-validate` package.

An object of a kind neither knows is an error, not a pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import all_versions, major_minor, schema_contents
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ROOT / "k8s" / "overlays"
CRD_DIR = Path(os.environ.get("RP_K8S_CRDS", ROOT.parent / "shared" / "k8s-crds"))
# The Kubernetes release the core objects are checked against: the oldest one we support deploying to.
KUBERNETES_VERSION = "1.30.0"

_Loader = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)  # the CRDs are 1 MB each: libyaml reads them 10x faster


class ManifestError(Exception):
    """Rendering failed, or an object does not validate; the message names the object and the field."""


# -------------------------------------------------------------------------------------------------- rendering
def kubectl() -> str:
    found = shutil.which(os.environ.get("KUBECTL") or "kubectl")
    if not found:
        raise ManifestError(
            "kubectl not found: install Debian's kubernetes-client (`apt-get install -y "
            "kubernetes-client`; .ci/run does) or point $KUBECTL at a kubectl binary"
        )
    return found


def render(kustomization: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`, parsed: the objects `kubectl apply -k DIR` would send."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(kustomization)], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise ManifestError(f"kubectl kustomize {kustomization} failed:\n{done.stderr.strip()}")
    return [obj for obj in yaml.load_all(done.stdout, Loader=_Loader) if obj is not None]


def kustomizations(root: Path = OVERLAYS) -> list[Path]:
    """Every folder under `root` that holds a kustomization.yaml (the overlays and their jobs/ folders)."""
    return sorted(p.parent for p in root.rglob("kustomization.yaml"))


# ------------------------------------------------------------------------------------ CRD schema, made strict
def strict_schema(node: Any) -> Any:
    """A copy of an OpenAPI v3 CRD schema as a JSON schema refusing unknown fields (see the module doc)."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":  # property names are data, not schemas: convert their values only
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("enum", "default", "example"):  # data, kept as is
            out[key] = value
        else:
            out[key] = strict_schema(value)
    is_object = node.get("type") == "object" or "properties" in node
    if (
        is_object
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


def _list_type(validator, list_type, instance, schema):
    """`x-kubernetes-list-type`: a `set` holds no duplicates, a `map` no two items with equal key fields."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen: list[Any] = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate item {item!r} in a list-type=set")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen_keys: set[tuple] = set()
        for item in instance:
            key = tuple(repr(item.get(k)) for k in keys) if isinstance(item, dict) else (repr(item),)
            if key in seen_keys:
                shown = {k: item.get(k) for k in keys} if isinstance(item, dict) else item
                yield jsonschema.ValidationError(
                    f"two items share the key {shown} (list-type=map keyed by {keys})"
                )
            seen_keys.add(key)


def _cel_rules(validator, rules, instance, schema):
    """CEL rules need the API server: fail loudly instead of passing a field nobody checked."""
    yield jsonschema.ValidationError(
        "this field has CEL rules the offline validator cannot evaluate; check them by hand and extend "
        f"k8s/validate.py: {[rule.get('rule') for rule in rules]}"
    )


_formats = jsonschema.FormatChecker()
_formats.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v < 2**31)
_formats.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)

# OpenAPI 3.0 schemas are Draft 4 in what they share with JSON schema (boolean exclusiveMinimum and so on).
StrictCrdValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {
        "x-kubernetes-list-type": _list_type,
        "x-kubernetes-validations": _cel_rules,
    },
)


@cache
def crd_validators(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> validator, for every served version of every CRD in `crd_dir`."""
    files = sorted(crd_dir.glob("*.yaml"))
    if not files:
        raise ManifestError(f"no CRDs found in {crd_dir} (set $RP_K8S_CRDS)")
    validators = {}
    for path in files:
        with path.open() as f:
            for crd in yaml.load_all(f, Loader=_Loader):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    if version.get("served", True):
                        schema = strict_schema(version["schema"]["openAPIV3Schema"])
                        # The API server checks a custom resource's metadata as ObjectMeta, whatever the CRD
                        # says (every CRD says a bare `type: object`); object_errors does the same.
                        schema["properties"]["metadata"] = {"type": "object"}
                        validators[(f"{group}/{version['name']}", kind)] = StrictCrdValidator(
                            schema, format_checker=_formats
                        )
    return validators


# ---------------------------------------------------------------------------------------------- core objects
def _schema_dir() -> str:
    if major_minor(KUBERNETES_VERSION) > major_minor(kubernetes_validate.latest_version()):
        raise ManifestError(
            f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for "
            f"Kubernetes {KUBERNETES_VERSION}: pip install 'kubernetes-validate>=1.30'"
        )
    version = [v for v in all_versions() if major_minor(v) <= major_minor(KUBERNETES_VERSION)][-1]
    return f"kubernetes-json-schema/v{version}-local-strict"


@cache
def object_meta_validator() -> jsonschema.protocols.Validator:
    """Kubernetes' strict ObjectMeta schema, for the metadata of custom resources."""
    folder = _schema_dir()
    schema = schema_contents(f"{folder}/objectmeta-meta-v1.json", KUBERNETES_VERSION)
    definitions = schema_contents(f"{folder}/_definitions.json", KUBERNETES_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


# --------------------------------------------------------------------------------------------------- validate
def describe(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{meta.get('name')}"


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def object_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of one object, one line each ("field.path: what is wrong"); [] when valid."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    crds = crd_validators()
    if key in crds:
        errors = [f"{_path(e)}: {e.message}" for e in crds[key].iter_errors(obj)]
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            errors += [f"metadata.{_path(e)}: {e.message}" for e in object_meta_validator().iter_errors(meta)]
        return sorted(errors)
    if key[0] and key[0].split("/")[0].endswith("ray.io"):
        return [f"no CRD in {CRD_DIR} for {key[0]} {key[1]}"]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_path(e)}: {e.message}"]  # kubernetes-validate reports the first violation only
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def validate(objects: Iterable[dict[str, Any]]) -> None:
    """Raise ManifestError listing every invalid object, or return quietly."""
    problems = [f"{describe(obj)}: {err}" for obj in objects for err in object_errors(obj)]
    if problems:
        raise ManifestError("\n".join(problems))


def iter_containers(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every container of every pod template in an object, CRs included."""

    def walk(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):  # a pod spec
                for field in ("initContainers", "containers"):
                    for c in node.get(field) or []:
                        yield f"{where}.{field}[{c.get('name')}]", node, c
            for key, value in node.items():
                yield from walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                yield from walk(item, f"{where}[{i}]")

    yield from walk(obj.get("spec"), describe(obj))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kustomizations", nargs="*", type=Path, help="default: every one under k8s/overlays")
    args = parser.parse_args(argv)
    failed = False
    for path in args.kustomizations or kustomizations():
        try:
            objects = render(path)
            validate(objects)
        except ManifestError as e:
            failed = True
            print(f"FAIL {path}\n{e}", file=sys.stderr)
        else:
            print(
                f"ok   {path}: {len(objects)} objects ({', '.join(sorted({describe(o) for o in objects}))})"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
