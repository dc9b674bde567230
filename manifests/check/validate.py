#!/usr/bin/env python3
"""Offline validation of Weft's rendered manifests (run by manifests/check.sh).

No API server is at hand, so each kind of object is checked against the schema an API server
would hold:

- built-in kinds (Deployment, ClusterRole, CustomResourceDefinition, ...): the Kubernetes
  OpenAPI schemas bundled by the `kubernetes-validate` package, strict (an unknown field is
  an error, as `kubectl apply` makes it), at the oldest Kubernetes version Weft supports and
  at the newest the package knows;
- custom resources of a CRD in the rendered set (AuthorizationPolicy): that CRD's structural
  schema, with the API server's semantics emulated: unknown fields (which the API server
  prunes, and `kubectl apply` refuses), nulls of non-nullable fields (pruned), value
  constraints (with `jsonschema`), list-type set/map uniqueness, and the CEL rules
  (`x-kubernetes-validations`), evaluated with a CEL interpreter;
- Gateway API kinds (their CRDs are not Weft's): the Gateway API's own types, enums, patterns
  and bounds, from the `@kubernetes-models/gateway-api` npm package (gateway-api.mjs). That
  package does not refuse unknown fields: WEFT_EXTRA_CRDS (CRD files or directories, such as
  the Gateway API's experimental-install.yaml) adds CRDs whose structural schemas are then
  checked as strictly as Weft's own.

It also lints Weft's CRDs for what the API server would refuse at install time (a node
without a type, `additionalProperties: false`, CEL rules without bounds for the cost
estimator), checks the wiring between objects (selectors, service accounts, volumes, role
references), and runs the cases of authorizationpolicy-cases.yaml: objects the CRD must
accept, and objects it must refuse at a given field.

Usage: validate.py RENDERED.yaml...   (exits 1 if anything fails)
"""

import copy
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

HERE = Path(__file__).resolve().parent
CASES = HERE / "authorizationpolicy-cases.yaml"
GATEWAY_CHECK = HERE / "gateway-api.mjs"
GATEWAY_GROUP = "gateway.networking.k8s.io"

# The oldest Kubernetes Weft supports: the CRD's ipBlocks rule uses the CEL IP library, which
# CRD validation rules may use from 1.31 on.
OLDEST_KUBERNETES = "1.31"

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class Report:
    """Counts and prints one line per check."""

    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def skip(self, what):
        self.skipped += 1
        print(f"SKIPPED  {what}")

    def ok(self, what):
        self.passed += 1
        print(f"ok    {what}")

    def fail(self, what, errors):
        self.failed += 1
        print(f"FAIL  {what}")
        for e in errors:
            print(f"        {e}")

    def check(self, what, errors):
        if errors:
            self.fail(what, errors)
        else:
            self.ok(what)


def describe(obj):
    ns = obj.get("metadata", {}).get("namespace")
    name = obj.get("metadata", {}).get("name")
    return f"{obj.get('kind')} {ns + '/' if ns else ''}{name}"


def group_version(obj):
    api_version = obj.get("apiVersion", "")
    group, _, version = api_version.rpartition("/")
    return group, version


# --- structural schemas (CRDs) ------------------------------------------------------------


def to_json_schema(node):
    """The value constraints of a structural schema node, as JSON Schema (draft 7).

    What JSON Schema cannot say the same way is handled elsewhere: unknown fields and nulls
    by `prune`, list-type map keys by `list_map_errors`, CEL rules by `Cel.failures`."""
    out = {}
    t = node.get("type")
    if t:
        out["type"] = [t, "null"] if node.get("nullable") else t
    constraints = (
        "enum", "pattern", "minimum", "maximum", "multipleOf", "minLength", "maxLength",
        "minItems", "maxItems", "minProperties", "maxProperties", "required",
    )  # fmt: skip
    for key in constraints:
        if key in node:
            out[key] = node[key]
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(node["additionalProperties"])
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out[key] = [to_json_schema(n) for n in node[key]]
    if "not" in node:
        out["not"] = to_json_schema(node["not"])
    return out


def child_schema(node, key):
    props = node.get("properties", {})
    if key in props:
        return props[key]
    extra = node.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def prune(value, node, path, errors, root=False):
    """The object as the API server stores it: unknown fields reported (kubectl apply's
    Strict field validation refuses them; other clients see them dropped) and removed, nulls
    of non-nullable fields removed, absent fields with a `default` defaulted."""
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if isinstance(value, dict) and node.get("type", "object") == "object":
        out = {}
        for key, v in value.items():
            here = f"{path}.{key}" if path else key
            if root and key in ("apiVersion", "kind", "metadata"):
                out[key] = v
                continue
            sub = child_schema(node, key)
            if sub is None:
                if preserve:
                    out[key] = v
                else:
                    errors.append(f"{here}: unknown field (kubectl apply refuses it; other clients see it pruned)")
                continue
            if v is None and not sub.get("nullable"):
                continue
            out[key] = prune(v, sub, here, errors)
        for key, sub in node.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = prune(copy.deepcopy(sub["default"]), sub, f"{path}.{key}" if path else key, errors)
        return out
    if isinstance(value, list) and node.get("type") == "array" and "items" in node:
        return [prune(v, node["items"], f"{path}[{i}]", errors) for i, v in enumerate(value)]
    return value


def walk(value, node, path):
    """Every (value, schema node, path) of a pruned object, parents first."""
    yield value, node, path
    if isinstance(value, dict):
        for key, v in value.items():
            if not path and key in ("apiVersion", "kind", "metadata"):
                continue
            sub = child_schema(node, key)
            if sub is not None:
                yield from walk(v, sub, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and "items" in node:
        for i, v in enumerate(value):
            yield from walk(v, node["items"], f"{path}[{i}]")


def list_map_errors(pruned, schema):
    errors = []
    for value, node, path in walk(pruned, schema, ""):
        if node.get("x-kubernetes-list-type") == "map" and isinstance(value, list):
            keys = node.get("x-kubernetes-list-map-keys", [])
            seen = set()
            for i, item in enumerate(value):
                k = tuple(json.dumps(item.get(key)) for key in keys) if isinstance(item, dict) else None
                if k in seen:
                    errors.append(f"{path}[{i}]: duplicate entry for key {keys}")
                seen.add(k)
    return errors


def short_message(error):
    """jsonschema's message, without the whole offending value when it is a long one."""
    if len(error.message) <= 200:
        return error.message
    return f"violates {error.validator}: {error.validator_value}"


def json_path(error):
    path = ""
    for p in error.absolute_path:
        path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else p)
    return path or "(root)"


# --- CEL -----------------------------------------------------------------------------------


def _k8s_ip(text):
    """Kubernetes' isIP: an IPv4 or IPv6 address, no zone, no IPv4-mapped IPv6 form."""
    if not isinstance(text, str) or "%" in text:
        return None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return None
    return addr


def k8s_is_ip(text):
    return _k8s_ip(text) is not None


def k8s_is_cidr(text):
    """Kubernetes' isCIDR (Go's netip.ParsePrefix): an address, '/', a prefix length without
    leading zeros; host bits may be set."""
    if not isinstance(text, str) or text.count("/") != 1:
        return False
    addr, bits = text.split("/")
    addr = _k8s_ip(addr)
    if addr is None or not re.fullmatch(r"0|[1-9][0-9]*", bits):
        return False
    return int(bits) <= addr.max_prefixlen


class Cel:
    """CEL rules evaluated with the `cel` package (a CEL interpreter) and the Kubernetes
    library functions Weft's CRD uses. What the API server also does and this does not:
    type-check each rule against the schema and estimate its cost (lint_crd checks the
    bounds the estimate needs)."""

    def __init__(self):
        try:
            import cel  # the `common-expression-language` package
        except ImportError:
            self.cel = None
            return
        self.cel = cel

    def failures(self, pruned, schema):
        errors = []
        for value, node, path in walk(pruned, schema, ""):
            for rule in node.get("x-kubernetes-validations", []):
                # Transition rules run only on updates; these objects are being created.
                if re.search(r"\boldSelf\b", rule["rule"]):
                    continue
                ctx = self.cel.Context()
                ctx.add_variable("self", value)
                ctx.add_function("isIP", k8s_is_ip)
                ctx.add_function("isCIDR", k8s_is_cidr)
                try:
                    result = self.cel.evaluate(rule["rule"], ctx)
                except Exception as e:  # noqa: BLE001 - any evaluation error fails the rule
                    errors.append(f"{path or '(root)'}: rule {rule['rule']!r} could not be evaluated: {e}")
                    continue
                if result is not True:
                    errors.append(f"{path or '(root)'}: {rule.get('message', 'failed rule ' + rule['rule'])}")
        return errors


class Crd:
    """One served version of a CRD, and how an object of it is validated."""

    def __init__(self, crd, version):
        self.crd = crd
        self.name = crd["metadata"]["name"]
        self.group = crd["spec"]["group"]
        self.kind = crd["spec"]["names"]["kind"]
        self.version = version["name"]
        self.schema = version["schema"]["openAPIV3Schema"]
        self.validator = jsonschema.Draft7Validator(to_json_schema(self.schema))

    def errors(self, obj, cel):
        errors = []
        name = obj.get("metadata", {}).get("name", "")
        if not (DNS_SUBDOMAIN.match(name) and len(name) <= 253):
            errors.append(f"metadata.name: {name!r} is not a DNS subdomain")
        pruned = prune(obj, self.schema, "", errors, root=True)
        errors += [f"{json_path(e)}: {short_message(e)}" for e in self.validator.iter_errors(pruned)]
        errors += list_map_errors(pruned, self.schema)
        # The API server runs CEL rules only on a value that passed the schema's checks.
        if not errors and cel.cel is not None:
            errors += cel.failures(pruned, self.schema)
        return errors


def load_crds(docs):
    crds = {}
    for obj in docs:
        if obj.get("kind") == "CustomResourceDefinition":
            for version in obj["spec"]["versions"]:
                if version.get("served"):
                    c = Crd(obj, version)
                    crds[(c.group, c.version, c.kind)] = c
    return crds


# Functions and macros of the CEL environment of CRD rules (CEL's standard library and the
# Kubernetes libraries), for catching a misspelt one in a branch no case reaches: the API
# server type-checks every rule when the CRD is written, and this check cannot.
# fmt: off
CEL_FUNCTIONS = {
    "size", "has", "all", "exists", "exists_one", "map", "filter", "matches", "startsWith",
    "endsWith", "contains", "int", "uint", "double", "string", "bool", "bytes", "type", "dyn",
    "timestamp", "duration", "getDate", "getFullYear", "getHours", "getMinutes", "getSeconds",
    "charAt", "indexOf", "lastIndexOf", "lowerAscii", "upperAscii", "replace", "split",
    "substring", "trim", "join", "reverse", "format", "quote", "isSorted", "sum", "min", "max",
    "isURL", "url", "getScheme", "getHost", "getHostname", "getPort",
    "getEscapedPath", "getQuery", "isIP", "ip", "isCIDR", "cidr", "family", "isUnspecified",
    "isLoopback", "isLinkLocalMulticast", "isLinkLocalUnicast", "isGlobalUnicast",
    "containsIP", "containsCIDR", "masked", "prefixLength", "isQuantity", "quantity",
    "isSemver", "semver", "optional", "orValue", "hasValue", "value", "base64",
}
# fmt: on


# The API server's cost budget for one CRD rule, and for all of a CRD's rules together
# (apiextensions' StaticEstimatedCostLimit and StaticEstimatedCRDCostLimit).
RULE_COST_LIMIT = 10_000_000
CRD_COST_LIMIT = 100_000_000


def estimated_cost(rule, node):
    """An upper bound of what the API server's estimator charges for one evaluation of a rule
    on a string node, with cel-go's factors: a regular expression match costs
    ceil(0.1 x string size) x ceil(0.25 x pattern length), a string traversal (isIP, isCIDR,
    startsWith, endsWith) ceil(0.1 x string size). The string's size is taken at 4 bytes per
    character of maxLength, the worst case of UTF-8. Every other operation is charged 1 per
    identifier, call or operator, which overcounts."""
    size = 4 * node.get("maxLength", 0)
    traverse = -(-size // 10)
    cost = 0
    for pattern in re.findall(r"\.matches\('((?:[^'\\]|\\.)*)'\)", rule):
        cost += traverse * -(-len(pattern) // 4)
    cost += traverse * len(re.findall(r"\b(isIP|isCIDR|startsWith|endsWith)\(", rule))
    return cost + len(re.findall(r"[A-Za-z_]+|\|\||&&|==|[<>!]=?", rule))


def lint_rules(crd, cel):
    """Every CEL rule parses, calls only functions the Kubernetes environment has, and stays
    within the cost budget at the bounds of the lists that hold it. Returns (errors, the
    highest estimate of one rule, the CRD's total)."""
    errors, highest, total = [], 0, 0
    for v in crd["spec"]["versions"]:
        for node, path, cardinality in walk_schema(v.get("schema", {}).get("openAPIV3Schema", {}), v["name"], 1):
            for rule in node.get("x-kubernetes-validations", []):
                text = rule["rule"]
                unknown = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", text)) - CEL_FUNCTIONS
                if unknown:
                    errors.append(f"{path}: rule {text!r} calls {sorted(unknown)}, unknown to Kubernetes' CEL")
                if cel.cel is not None:
                    try:
                        cel.cel.compile(text)
                    except Exception as e:  # noqa: BLE001 - a parse error, whatever its type
                        errors.append(f"{path}: rule {text!r} does not parse: {e}")
                cost = estimated_cost(text, node) * cardinality
                if cost > RULE_COST_LIMIT:
                    errors.append(f"{path}: rule {text!r} may cost {cost} (x{cardinality}), over {RULE_COST_LIMIT}")
                highest, total = max(highest, cost), total + cost
    if total > CRD_COST_LIMIT:
        errors.append(f"the rules may cost {total} together, over {CRD_COST_LIMIT}")
    return errors, highest, total


def walk_schema(node, path, cardinality):
    """Every schema node, with how many times per object a rule on it may run."""
    yield node, path, cardinality
    for key, sub in node.get("properties", {}).items():
        yield from walk_schema(sub, f"{path}.{key}", cardinality)
    if isinstance(node.get("items"), dict):
        yield from walk_schema(node["items"], f"{path}[]", cardinality * node.get("maxItems", 1_000_000))
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk_schema(
            node["additionalProperties"], f"{path}.*", cardinality * node.get("maxProperties", 1_000_000)
        )


def lint_crd(crd):
    """What an API server would refuse in a CRD, or accept and regret."""
    errors = []
    spec = crd["spec"]
    if crd["metadata"]["name"] != f"{spec['names']['plural']}.{spec['group']}":
        errors.append("metadata.name must be <plural>.<group>")
    versions = spec["versions"]
    if sum(1 for v in versions if v.get("storage")) != 1:
        errors.append("exactly one version must be the storage version")
    for v in versions:
        schema = v.get("schema", {}).get("openAPIV3Schema")
        where = f"versions[{v['name']}]"
        if schema is None:
            errors.append(f"{where}: no openAPIV3Schema")
            continue
        root_props = set(schema.get("properties", {}))
        if not root_props <= {"apiVersion", "kind", "metadata", "spec", "status"}:
            errors.append(f"{where}: the root may only hold apiVersion, kind, metadata, spec and status")
        if set(schema.get("properties", {}).get("metadata", {})) - {"type", "properties"}:
            errors.append(f"{where}: metadata may only be typed (and restrict name/generateName)")
        if "status" in v.get("subresources", {}) and "status" not in root_props:
            errors.append(f"{where}: a status subresource without a status schema")
        errors += lint_node(schema, f"{where}.schema", cardinality=1, root=True)
    return errors


def lint_node(node, path, cardinality, root=False):
    errors = []
    open_node = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    t = node.get("type")
    if not t and not open_node:
        errors.append(f"{path}: no type (a structural schema types every node)")
    if node.get("additionalProperties") is False:
        errors.append(f"{path}: additionalProperties: false is not allowed; unknown fields are pruned")
    if "properties" in node and isinstance(node.get("additionalProperties"), dict):
        errors.append(f"{path}: properties and additionalProperties exclude each other")
    if node.get("uniqueItems"):
        errors.append(f"{path}: uniqueItems is not allowed; use x-kubernetes-list-type: set")
    for rule in node.get("x-kubernetes-validations", []):
        if not rule.get("message") and not rule.get("messageExpression"):
            errors.append(f"{path}: CEL rule {rule['rule']!r} has no message")
    # Bounds: the API server estimates a CEL rule's worst-case cost from the sizes of the
    # lists, maps and strings it may visit, and refuses the CRD when the estimate exceeds the
    # budget; every value here is bounded so that any rule stays cheap (and requests small).
    if t == "string" and "maxLength" not in node and "enum" not in node and node.get("format") != "date-time":
        errors.append(f"{path}: a string without maxLength")
    if t == "array":
        if "maxItems" not in node:
            errors.append(f"{path}: a list without maxItems")
        if node.get("x-kubernetes-list-type") == "map":
            missing = set(node.get("x-kubernetes-list-map-keys", [])) - set(node.get("items", {}).get("required", []))
            if missing:
                errors.append(f"{path}: list-map keys {sorted(missing)} must be required")
        errors += lint_node(node.get("items", {}), f"{path}.items", cardinality * node.get("maxItems", 1))
    if t == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            if "maxProperties" not in node:
                errors.append(f"{path}: a map without maxProperties")
            errors += lint_node(extra, f"{path}.additionalProperties", cardinality * node.get("maxProperties", 1))
        for key, sub in node.get("properties", {}).items():
            # The API server checks these three itself.
            if root and key in ("apiVersion", "kind", "metadata"):
                continue
            errors += lint_node(sub, f"{path}.properties.{key}", cardinality)
    if node.get("x-kubernetes-validations") and cardinality > 100_000:
        errors.append(f"{path}: a CEL rule that may run {cardinality} times per object")
    return errors


# --- built-in kinds ------------------------------------------------------------------------


def builtin_errors(obj, versions):
    import kubernetes_validate.utils as kv

    errors = []
    for version in versions:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"Kubernetes {version}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            errors.append(f"Kubernetes {version}: {e.message}")
    return errors


def kubernetes_versions():
    import kubernetes_validate.utils as kv

    return [OLDEST_KUBERNETES, kv.major_minor(kv.latest_version())]


# --- wiring between objects ----------------------------------------------------------------


def wiring_errors(docs):
    """References between the rendered objects that the API server would accept but that
    would not work: a selector that selects nothing, a missing account, volume or role."""
    errors = []
    by_kind = {}
    for obj in docs:
        by_kind.setdefault(obj["kind"], []).append(obj)

    def named(kind, ns, name):
        return any(
            o["metadata"]["name"] == name and o["metadata"].get("namespace") == ns for o in by_kind.get(kind, [])
        )

    workloads = by_kind.get("Deployment", []) + by_kind.get("DaemonSet", [])
    for w in workloads:
        ns = w["metadata"]["namespace"]
        template = w["spec"]["template"]
        labels = template["metadata"].get("labels", {})
        if any(labels.get(k) != v for k, v in w["spec"]["selector"]["matchLabels"].items()):
            errors.append(f"{describe(w)}: its selector does not select its own pods")
        pod = template["spec"]
        sa = pod.get("serviceAccountName", "default")
        if sa != "default" and not named("ServiceAccount", ns, sa):
            errors.append(f"{describe(w)}: service account {sa} is not in the manifests")
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod.get("initContainers", []) + pod["containers"]:
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    errors.append(f"{describe(w)}: container {c['name']} mounts unknown volume {m['name']}")
            ports = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            # A hostNetwork pod's declared ports are host ports, which would keep the surge pod of
            # a rolling update off the node: such a pod probes numbered ports it does not declare.
            host_network = pod.get("hostNetwork", False)
            surge = (w["spec"].get("updateStrategy", {}).get("rollingUpdate") or {}).get("maxSurge", 0)
            if host_network and surge not in (0, "0", "0%") and c.get("ports"):
                errors.append(
                    f"{describe(w)}: container {c['name']} declares ports on the host network: host ports that "
                    f"keep the surge pod (maxSurge {surge}) off every node"
                )
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                p = c.get(probe, {})
                port = (p.get("httpGet") or p.get("tcpSocket") or {}).get("port")
                if port is not None and port not in ports and not (host_network and isinstance(port, int)):
                    errors.append(
                        f"{describe(w)}: {probe} of {c['name']} targets port {port}, which it does not declare"
                    )
    for svc in by_kind.get("Service", []):
        ns, selector = svc["metadata"]["namespace"], svc["spec"].get("selector")
        if not selector:
            continue
        pods = [
            w
            for w in workloads
            if w["metadata"]["namespace"] == ns
            and all(w["spec"]["template"]["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())
        ]
        if not pods:
            errors.append(f"{describe(svc)}: its selector matches no pods in the manifests")
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w in pods:
                declared = [
                    p
                    for c in w["spec"]["template"]["spec"]["containers"]
                    for p in c.get("ports", [])
                    if p.get("name") == target or p["containerPort"] == target
                ]
                if not declared:
                    errors.append(
                        f"{describe(svc)}: port {port.get('name')} targets {target}, which {describe(w)} does not declare"
                    )
    for pdb in by_kind.get("PodDisruptionBudget", []):
        sel = pdb["spec"]["selector"]["matchLabels"]
        if not any(
            w["metadata"]["namespace"] == pdb["metadata"]["namespace"]
            and all(w["spec"]["template"]["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())
            for w in workloads
        ):
            errors.append(f"{describe(pdb)}: its selector matches no pods in the manifests")
    for binding in by_kind.get("RoleBinding", []) + by_kind.get("ClusterRoleBinding", []):
        ref = binding["roleRef"]
        ns = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        if not named(ref["kind"], ns, ref["name"]):
            errors.append(f"{describe(binding)}: {ref['kind']} {ref['name']} is not in the manifests")
    return errors


# --- Gateway API ---------------------------------------------------------------------------


def gateway_api_results(objects):
    """Runs gateway-api.mjs on the objects: [(object, errors)], or None with the reason when
    node or the package is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        return None, "node is not installed"
    root = os.environ.get("WEFT_NODE_MODULES")
    if not root and npm:
        root = subprocess.run([npm, "root", "-g"], check=False, capture_output=True, text=True).stdout.strip()
    if not root or not (Path(root) / "@kubernetes-models" / "gateway-api").is_dir():
        return None, f"@kubernetes-models/gateway-api is not installed under {root or 'npm root -g'}"
    run = subprocess.run(
        [node, str(GATEWAY_CHECK), root], check=False, input=json.dumps(objects), capture_output=True, text=True
    )
    if run.returncode != 0:
        return None, f"gateway-api.mjs failed: {run.stderr.strip()}"
    return [(o, r["errors"]) for o, r in zip(objects, json.loads(run.stdout))], None


# --- main ----------------------------------------------------------------------------------


def load(paths):
    docs = []
    for p in paths:
        with open(p) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    return docs


def extra_crds():
    crds = []
    for entry in filter(None, os.environ.get("WEFT_EXTRA_CRDS", "").split(os.pathsep)):
        p = Path(entry)
        files = sorted(p.rglob("*.yaml")) if p.is_dir() else [p]
        crds += [d for d in load(files) if d.get("kind") == "CustomResourceDefinition"]
    return crds


def main(paths):
    strict_ci = os.environ.get("CI") == "true"
    report = Report()
    docs = load(paths)
    print(f"{len(docs)} objects rendered from {', '.join(paths)}")

    cel = Cel()
    missing = []
    if cel.cel is None:
        missing.append("the `cel` module (pip: common-expression-language): CEL rules not evaluated")
    try:
        versions = kubernetes_versions()
    except ImportError:
        versions = None
        missing.append("kubernetes-validate (pip): built-in kinds not validated")

    own_crds = load_crds(docs)
    crds = dict(own_crds)
    extra = extra_crds()
    crds.update(load_crds(extra))
    if extra:
        print(f"{len(extra)} more CRDs from WEFT_EXTRA_CRDS")

    for c in {c.name: c for c in own_crds.values()}.values():
        report.check(f"CRD {c.name}: structural schema, bounds for CEL cost", lint_crd(c.crd))
        errors, highest, total = lint_rules(c.crd, cel)
        report.check(
            f"CRD {c.name}: CEL rules parse, call known functions, estimated cost at most {highest} "
            f"per rule (budget {RULE_COST_LIMIT}), {total} in all (budget {CRD_COST_LIMIT})",
            errors,
        )

    gateway_objects = []
    for obj in docs:
        group, version = group_version(obj)
        crd = crds.get((group, version, obj.get("kind")))
        if crd is not None:
            report.check(f"{describe(obj)} against CRD {crd.name} {crd.version}", crd.errors(obj, cel))
        elif group == GATEWAY_GROUP:
            gateway_objects.append(obj)
        elif versions is not None:
            report.check(
                f"{describe(obj)} against Kubernetes {' and '.join(versions)} (strict)", builtin_errors(obj, versions)
            )

    if gateway_objects:
        results, why = gateway_api_results(gateway_objects)
        if results is None:
            missing.append(f"Gateway API objects not validated: {why}")
        else:
            for obj, errors in results:
                report.check(
                    f"{describe(obj)} against the Gateway API's types (@kubernetes-models/gateway-api)", errors
                )

    report.check("wiring: selectors, service accounts, volumes, probe ports, role references", wiring_errors(docs))

    policy_crd = next((c for c in own_crds.values() if c.kind == "AuthorizationPolicy"), None)
    if policy_crd is None:
        report.fail("authorizationpolicy-cases.yaml", ["the AuthorizationPolicy CRD is not in the rendered manifests"])
    else:
        for case in yaml.safe_load(CASES.read_text()):
            if case.get("cel") and cel.cel is None:
                report.skip(f"case {case['name']}: needs the CEL interpreter")
                continue
            errors = policy_crd.errors(case["object"], cel)
            if "refuse" in case:
                expected = case["refuse"]
                if not any(e.startswith(expected) for e in errors):
                    report.fail(
                        f"case refused: {case['name']}", [f"expected an error at {expected}, got {errors or 'none'}"]
                    )
                else:
                    report.ok(f"case refused: {case['name']} ({next(e for e in errors if e.startswith(expected))})")
            else:
                report.check(f"case accepted: {case['name']}", errors)

    for m in missing:
        if strict_ci:
            report.fail("tools", [m])
        else:
            report.skip(m)
    skipped = f", {report.skipped} skipped" if report.skipped else ""
    print(f"\nmanifests: {report.passed} passed, {report.failed} failed{skipped}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
