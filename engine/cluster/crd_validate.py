"""Offline validation of KubeRay manifests against the CRDs' own schemas, plus the operator's rules.

`kubectl apply --validate=strict` checks a custom resource against its CRD's
`spec.versions[*].schema.openAPIV3Schema` (a Kubernetes *structural* schema), then the KubeRay
operator rejects what its Go validation (ray-operator/controllers/ray/utils/validation.go) finds
wrong. Neither is reachable without a cluster, so this module does both from the CRD files:

- the schema subset CRDs use: `type`, `required`, `properties`, `additionalProperties`, `enum`,
  `pattern`, lengths, bounds, `format: int32|int64`, `nullable`, `anyOf`,
  `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields`, and list types (`map`
  keys and `set` items unique). Unknown fields are errors (strict field validation), except
  under `x-kubernetes-preserve-unknown-fields`. An object with neither `properties` nor
  `additionalProperties` is one Kubernetes prunes whole, so any key in it is unknown too.
  `x-kubernetes-validations` (CEL) rules are not evaluated; the ones that matter are among the
  operator rules below.
- the operator's rules (`operator_rules`): names (DNS-1035 labels within KubeRay's length
  limits), containers present, no resources in both `rayStartParams` and `resources`, unique
  worker group names, `minReplicas <= replicas <= maxReplicas`, `rayVersion` set, RayJob TTL and
  shutdown consistency, `runtimeEnvYAML` parses, and a standard cron `schedule`.

Every error names the field's path, as kubectl does: `spec.rayClusterSpec.workerGroupSpecs[0]
.groupName: ...`. jsonschema (installed with Ray) is not used: Kubernetes' structural schemas are
OpenAPI with extensions, and what "unknown field" means depends on those extensions.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

# <repo>/../shared/schemas/kuberay: where the project keeps the CRDs of the KubeRay it targets.
DEFAULT_SCHEMAS = Path(__file__).resolve().parents[2].parent / "shared" / "schemas" / "kuberay"

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# KubeRay's limits (utils/constant.go): a RayCluster's services append up to 10 characters to its
# name, and a RayJob's cluster appends 6 to the RayJob's. A RayCronJob's RayJobs append a time
# suffix: 11 characters are left for it here (a conservative bound, not the operator's constant).
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
OBJECT_META = {
    "name",
    "generateName",
    "namespace",
    "labels",
    "annotations",
    "finalizers",
    "ownerReferences",
}


class ManifestError(ValueError):
    """A manifest the API server or the KubeRay operator would refuse; one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# ---------------------------------------------------------------------------------- schemas


@functools.cache
def _load_crd(path: Path) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=loader)


def load_schemas(directory: str | Path = DEFAULT_SCHEMAS) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of every CRD file there."""
    directory = Path(directory)
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no CRD files (*.yaml) in {directory}")
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in files:
        crd = _load_crd(path.resolve())
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


# ------------------------------------------------------------------------- structural schema


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not IDENTIFIER.match(key):
        return f"{path}[{key}]"  # map keys such as nvidia.com/gpu, as kubectl writes them
    return f"{path}.{key}" if path else key


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _type_ok(value: Any, expected: str) -> bool:
    actual = _type_of(value)
    return actual == expected or (expected == "number" and actual == "integer")


def validate_value(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Errors of `value` against one structural schema node (recursively), each `path: why`."""
    where = path or "<root>"
    if value is None:
        if schema.get("nullable"):
            return []
        return [f"{where}: null is not allowed (Kubernetes drops it; leave the field out)"]
    if schema.get("x-kubernetes-int-or-string"):
        if _type_of(value) not in ("integer", "string"):
            return [f"{where}: must be an integer or a string, got {_type_of(value)}"]
        if isinstance(value, str) and "pattern" in schema:
            return _check_scalar(value, {"pattern": schema["pattern"]}, where)
        return []
    if schema.get("anyOf"):
        base = {k: v for k, v in schema.items() if k != "anyOf"}
        failures = [validate_value(value, {**base, **branch}, path) for branch in schema["anyOf"]]
        if all(failures):
            return [f"{where}: matches none of the allowed forms ({failures[0][0]})"]
        return []
    errors: list[str] = []
    expected = schema.get("type")
    if expected and not _type_ok(value, expected):
        return [f"{where}: must be {expected}, got {_type_of(value)} ({value!r:.60})"]
    if isinstance(value, dict):
        errors += _check_object(value, schema, path)
    elif isinstance(value, list):
        errors += _check_array(value, schema, path)
    else:
        errors += _check_scalar(value, schema, where)
    return errors


def _check_scalar(value: Any, schema: dict[str, Any], where: str) -> list[str]:
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(repr(v) for v in schema["enum"])
        errors.append(f"{where}: unsupported value {value!r}; allowed: {allowed}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']!r}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: longer than {schema['maxLength']} characters")
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{where}: shorter than {schema['minLength']} characters")
    if _type_of(value) in ("integer", "number"):
        low, high = {"int32": INT32, "int64": INT64}.get(schema.get("format", ""), (None, None))
        if isinstance(value, int) and low is not None and not low <= value <= high:
            errors.append(f"{where}: {value} is out of range for {schema['format']}")
        if "minimum" in schema:
            exclusive = schema.get("exclusiveMinimum") is True
            if value < schema["minimum"] or (exclusive and value == schema["minimum"]):
                errors.append(f"{where}: must be >= {schema['minimum']}, got {value}")
        if "maximum" in schema:
            exclusive = schema.get("exclusiveMaximum") is True
            if value > schema["maximum"] or (exclusive and value == schema["maximum"]):
                errors.append(f"{where}: must be <= {schema['maximum']}, got {value}")
    return errors


def _check_object(value: dict[str, Any], schema: dict[str, Any], path: str) -> list[str]:
    errors = []
    where = path or "<root>"
    properties = schema.get("properties") or {}
    for name in schema.get("required") or []:
        if name not in value:
            errors.append(f"{_join(path, name)}: Required value")
    extra = schema.get("additionalProperties")
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    for key, item in value.items():
        if not isinstance(key, str):
            errors.append(f"{where}: key {key!r} is not a string")
        elif key in properties:
            errors += validate_value(item, properties[key], _join(path, key))
        elif isinstance(extra, dict):
            errors += validate_value(item, extra, _join(path, key))
        elif extra is True or preserve:
            continue
        else:
            errors.append(f"{_join(path, key)}: unknown field {key!r}")
    for name, bound in (("maxProperties", max), ("minProperties", min)):
        if name in schema and bound(len(value), schema[name]) != schema[name]:
            errors.append(f"{where}: {name} is {schema[name]}, got {len(value)} keys")
    return errors


def _check_array(value: list[Any], schema: dict[str, Any], path: str) -> list[str]:
    errors = []
    where = path or "<root>"
    if "minItems" in schema and len(value) < schema["minItems"]:
        errors.append(f"{where}: needs at least {schema['minItems']} items")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(f"{where}: allows at most {schema['maxItems']} items")
    items = schema.get("items")
    if isinstance(items, dict):
        for i, item in enumerate(value):
            errors += validate_value(item, items, _join(path, i))
    kind = schema.get("x-kubernetes-list-type")
    if kind == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen: dict[tuple, int] = {}
        for i, item in enumerate(value):
            if isinstance(item, dict):
                key = tuple(repr(item.get(k)) for k in keys)
                if key in seen:
                    named = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
                    errors.append(f"{_join(path, i)}: Duplicate value: {named}")
                seen.setdefault(key, i)
    elif kind == "set":
        seen_items: list[Any] = []
        for i, item in enumerate(value):
            if item in seen_items:
                errors.append(f"{_join(path, i)}: Duplicate value: {item!r}")
            seen_items.append(item)
    return errors


def _check_metadata(metadata: Any, path: str = "metadata") -> list[str]:
    """ObjectMeta, which the API server checks itself (the CRD only says `type: object`)."""
    if not isinstance(metadata, dict):
        return [f"{path}: must be object, got {_type_of(metadata)}"]
    errors = [f"{_join(path, k)}: unknown field {k!r}" for k in metadata if k not in OBJECT_META]
    if "name" not in metadata and "generateName" not in metadata:
        errors.append(f"{path}.name: Required value")
    namespace = metadata.get("namespace")
    if namespace is not None and not (
        isinstance(namespace, str) and len(namespace) <= 63 and DNS1123_LABEL.match(namespace)
    ):
        errors.append(f"{path}.namespace: {namespace!r} is not a DNS-1123 label")
    for block in ("labels", "annotations"):
        items = metadata.get(block)
        if items is None:
            continue
        if not isinstance(items, dict):
            errors.append(f"{path}.{block}: must be object, got {_type_of(items)}")
            continue
        for key, item in items.items():
            errors += _label_key(key, f"{path}.{block}")
            if not isinstance(item, str):
                errors.append(f"{_join(f'{path}.{block}', key)}: must be string")
            elif block == "labels" and (len(item) > 63 or not LABEL_VALUE.match(item)):
                errors.append(f"{_join(f'{path}.{block}', key)}: {item!r} is not a label value")
    return errors


def _label_key(key: Any, where: str) -> list[str]:
    """A qualified name: an optional DNS-1123 subdomain prefix, '/', a name of <= 63 chars."""
    if not isinstance(key, str):
        return [f"{where}: key {key!r} is not a string"]
    prefix, _, name = key.rpartition("/")
    if (prefix and not DNS1123_SUBDOMAIN.match(prefix)) or len(name) > 63:
        return [f"{_join(where, key)}: {key!r} is not a qualified name"]
    if not LABEL_NAME.match(name):
        return [f"{_join(where, key)}: {key!r} is not a qualified name"]
    return []


# --------------------------------------------------------------------------- operator rules


def _name_errors(kind: str, name: Any, path: str) -> list[str]:
    if not isinstance(name, str):
        return []  # reported by the metadata check
    errors = []
    limit = MAX_NAME.get(kind, 63)
    if len(name) > limit:
        errors.append(f"{path}: {kind} name should be no more than {limit} characters")
    if not DNS1035_LABEL.match(name):
        errors.append(
            f"{path}: {name!r} is not a DNS-1035 label (lower-case letters, digits and '-', "
            "starting with a letter, ending with a letter or digit)"
        )
    return errors


def _containers(template: Any) -> list[Any]:
    spec = template.get("spec") if isinstance(template, dict) else None
    containers = spec.get("containers") if isinstance(spec, dict) else None
    return containers if isinstance(containers, list) else []


def _group_rules(group: dict[str, Any], path: str, label: str) -> list[str]:
    errors = []
    if not _containers(group.get("template")):
        errors.append(
            f"{path}.template.spec.containers: {label} should have at least one container"
        )
    params = group.get("rayStartParams") or {}
    if isinstance(params, dict):
        in_params = any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources"))
        if in_params and group.get("resources"):
            errors.append(
                f"{path}.resources: resource fields should not be set in both rayStartParams "
                f"and resources for {label}; use only one"
            )
        if "labels" in params:
            errors.append(f"{path}.rayStartParams[labels]: not supported; use {path}.labels")
    for i, container in enumerate(_containers(group.get("template"))):
        name = container.get("name") if isinstance(container, dict) else None
        if isinstance(name, str) and not (len(name) <= 63 and DNS1123_LABEL.match(name)):
            where = f"{path}.template.spec.containers[{i}].name"
            errors.append(f"{where}: {name!r} is not a DNS-1123 label")
    return errors


def ray_cluster_rules(spec: Any, path: str) -> list[str]:
    """KubeRay's ValidateRayClusterSpec, plus `rayVersion` set and replica bounds."""
    if not isinstance(spec, dict):
        return []
    errors = []
    if not spec.get("rayVersion"):
        errors.append(f"{path}.rayVersion: Required value (the Ray version of the image)")
    head = spec.get("headGroupSpec")
    if isinstance(head, dict):
        errors += _group_rules(head, f"{path}.headGroupSpec", "headGroupSpec")
    workers = spec.get("workerGroupSpecs") or []
    names: dict[str, int] = {}
    for i, group in enumerate(workers if isinstance(workers, list) else []):
        where = f"{path}.workerGroupSpecs[{i}]"
        if not isinstance(group, dict):
            continue
        name = group.get("groupName")
        errors += _group_rules(group, where, f"worker group {name!r}")
        if isinstance(name, str):
            if name in names:
                errors.append(
                    f"{where}.groupName: worker group name {name!r} is used twice "
                    f"(also workerGroupSpecs[{names[name]}])"
                )
            names.setdefault(name, i)
            if not (len(name) <= 63 and DNS1123_LABEL.match(name)):
                errors.append(f"{where}.groupName: {name!r} is not a DNS-1123 label")
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", INT32[1])
        replicas = group.get("replicas", low)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, replicas)):
            if low > high:
                errors.append(f"{where}.minReplicas: {low} is above maxReplicas {high}")
            elif not low <= replicas <= high:
                errors.append(f"{where}.replicas: {replicas} is outside [{low}, {high}]")
            if low < 0:
                errors.append(f"{where}.minReplicas: must be >= 0")
    return errors


def ray_job_rules(spec: Any, path: str) -> list[str]:
    """KubeRay's ValidateRayJobSpec (the parts a generated manifest can get wrong)."""
    if not isinstance(spec, dict):
        return []
    errors = []
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if spec.get("suspend") and not shutdown:
        errors.append(f"{path}.suspend: a RayJob without shutdownAfterJobFinishes cannot suspend")
    if isinstance(ttl, int) and ttl < 0:
        errors.append(f"{path}.ttlSecondsAfterFinished: must be a non-negative integer")
    if isinstance(ttl, int) and ttl > 0 and not shutdown:
        errors.append(
            f"{path}.ttlSecondsAfterFinished: only allowed with shutdownAfterJobFinishes: true"
        )
    selector = spec.get("clusterSelector")
    if spec.get("rayClusterSpec") is None and not selector:
        errors.append(
            f"{path}.rayClusterSpec: one of rayClusterSpec or clusterSelector is required"
        )
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        errors.append(
            f"{path}.submissionMode: unsupported value {mode!r}; allowed: "
            + ", ".join(SUBMISSION_MODES)
        )
    if mode != "InteractiveMode" and not spec.get("entrypoint"):
        errors.append(f"{path}.entrypoint: Required value (the command the job runs)")
    deadline = spec.get("activeDeadlineSeconds")
    if isinstance(deadline, int) and deadline <= 0:
        errors.append(f"{path}.activeDeadlineSeconds: must be a positive integer")
    backoff = spec.get("backoffLimit")
    if isinstance(backoff, int) and backoff < 0:
        errors.append(f"{path}.backoffLimit: must be >= 0")
    runtime_env = spec.get("runtimeEnvYAML")
    if isinstance(runtime_env, str):
        try:
            parsed = yaml.safe_load(runtime_env)
        except yaml.YAMLError as exc:
            errors.append(f"{path}.runtimeEnvYAML: not valid YAML: {exc}")
        else:
            if parsed is not None and not isinstance(parsed, dict):
                errors.append(f"{path}.runtimeEnvYAML: must be a YAML mapping")
    errors += ray_cluster_rules(spec.get("rayClusterSpec"), f"{path}.rayClusterSpec")
    return errors


MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
WEEKDAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
CRON_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {m: i + 1 for i, m in enumerate(MONTHS)},
    ),
    ("day of week", 0, 6, {d: i for i, d in enumerate(WEEKDAYS)}),
)
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_errors(schedule: str) -> list[str]:
    """Problems of a standard 5-field cron schedule (robfig/cron's ParseStandard, which KubeRay
    uses): `*`, numbers, names, ranges, steps, lists, `?` in the day fields, descriptors."""
    if "TZ" in schedule:
        return ["cannot use TZ or CRON_TZ in schedule; use timeZone instead"]
    text = schedule.strip()
    if text.startswith("@"):
        if text in CRON_DESCRIPTORS or re.fullmatch(
            r"@every\s+(\d+(\.\d+)?(ns|us|ms|s|m|h))+", text
        ):
            return []
        return [f"unknown descriptor {text!r}"]
    fields = text.split()
    if len(fields) != 5:
        return [
            f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"
        ]
    errors = []
    for field, (name, low, high, names) in zip(fields, CRON_FIELDS, strict=True):
        for part in field.split(","):
            errors += _cron_part(part, name, low, high, names)
    return errors


def _cron_part(part: str, name: str, low: int, high: int, names: dict[str, int]) -> list[str]:
    body, _, step = part.partition("/")
    if step and (not step.isdigit() or int(step) == 0):
        return [f"{name}: bad step in {part!r}"]
    if body in ("*", "?"):
        if body == "?" and name not in ("day of month", "day of week"):
            return [f"{name}: '?' only in the day fields"]
        return []

    def number(text: str) -> int | None:
        if text.upper() in names:
            return names[text.upper()]
        return int(text) if text.isdigit() else None

    start, _, end = body.partition("-")
    values = [number(start), number(end) if end else number(start)]
    if None in values:
        return [f"{name}: cannot parse {part!r}"]
    first, last = values
    assert first is not None and last is not None
    if not (low <= first <= high and low <= last <= high) or first > last:
        return [f"{name}: {part!r} is outside {low}-{high}"]
    return []


def ray_cron_job_rules(manifest: dict[str, Any]) -> list[str]:
    spec = manifest.get("spec")
    if not isinstance(spec, dict):
        return []
    errors = []
    schedule = spec.get("schedule")
    if isinstance(schedule, str):
        errors += [f"spec.schedule: invalid cron schedule: {e}" for e in cron_errors(schedule)]
    if spec.get("jobTemplate") is None:
        errors.append("spec.jobTemplate: Required value")
    errors += ray_job_rules(spec.get("jobTemplate"), "spec.jobTemplate")
    return errors


def operator_rules(manifest: dict[str, Any]) -> list[str]:
    """What the KubeRay operator refuses in a manifest the schema accepts."""
    kind = manifest.get("kind")
    metadata = manifest.get("metadata") if isinstance(manifest.get("metadata"), dict) else {}
    errors = _name_errors(str(kind), metadata.get("name"), "metadata.name")
    if kind == "RayJob":
        errors += ray_job_rules(manifest.get("spec"), "spec")
    elif kind == "RayCluster":
        errors += ray_cluster_rules(manifest.get("spec"), "spec")
    elif kind == "RayCronJob":
        errors += ray_cron_job_rules(manifest)
    if manifest.get("status") is not None:
        errors.append("status: set by the operator, not in a manifest")
    return errors


# --------------------------------------------------------------------------------- entry points


def validate_manifest(
    manifest: Any, schemas: dict[tuple[str, str], dict[str, Any]] | None = None
) -> list[str]:
    """Every problem of one manifest (schema, metadata, operator rules); [] when it is valid."""
    if not isinstance(manifest, dict):
        return [f"<root>: a manifest is a mapping, got {_type_of(manifest)}"]
    schemas = load_schemas() if schemas is None else schemas
    api, kind = manifest.get("apiVersion"), manifest.get("kind")
    schema = schemas.get((str(api), str(kind)))
    if schema is None:
        known = ", ".join(f"{a} {k}" for a, k in sorted(schemas))
        return [f"apiVersion/kind: no CRD for {api} {kind}; known: {known}"]
    errors = [e for e in validate_value(manifest, schema) if not e.startswith("metadata")]
    errors += _check_metadata(manifest.get("metadata"))
    errors += operator_rules(manifest)
    return list(dict.fromkeys(errors))  # a rule and the schema may say the same thing


def check_manifests(
    manifests: Iterable[Any], schemas: dict[tuple[str, str], dict[str, Any]] | None = None
) -> None:
    """Raise ManifestError naming every problem of every manifest (prefixed by its kind/name)."""
    schemas = load_schemas() if schemas is None else schemas
    errors = []
    for manifest in manifests:
        problems = validate_manifest(manifest, schemas)
        if problems:
            kind = manifest.get("kind", "?") if isinstance(manifest, dict) else "?"
            meta = manifest.get("metadata") if isinstance(manifest, dict) else None
            name = meta.get("name", "?") if isinstance(meta, dict) else "?"
            errors += [f"{kind} {name}: {p}" for p in problems]
    if errors:
        raise ManifestError(errors)
