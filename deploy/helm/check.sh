#!/usr/bin/env bash
# `make helm-check`: the Helm chart checked without a cluster.
#
#   helm lint        the chart's structure and templates
#   helm template    rendered with the default values and with autoscaling
#                    off and an existing Secret (every branch of the templates)
#   kubeconform      every rendered object against the Kubernetes 1.31 JSON
#                    schemas, strict (unknown fields are errors); a kind
#                    without a schema is an error, not skipped
#
# Tools, pinned and cached under .tools/ (a second run builds nothing):
# Helm and kubeconform built from their Go modules (`go install`), the
# schemas from the kubernetes-validate wheel on PyPI (SHA-256 checked),
# made standalone (standalone_schemas.py) for kubeconform.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TOOLS="$ROOT/.tools"
GOBIN="$TOOLS/go/bin"
HELM_VERSION=v4.3.2
KUBECONFORM_VERSION=v0.7.0
K8S_VERSION=1.31.0
SCHEMAS_WHEEL=kubernetes_validate-1.37.0-py3-none-any.whl
SCHEMAS_SHA256=85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9
SCHEMAS="$TOOLS/k8s-schemas/v$K8S_VERSION-standalone-strict"
CHART="$ROOT/deploy/helm/marie"

tool() {  # name module version
    local stamp="$GOBIN/.$1-$3"
    if [ ! -x "$GOBIN/$1" ] || [ ! -f "$stamp" ]; then
        echo "helm-check: building $1 $3 (once)" >&2
        GOBIN="$GOBIN" GOFLAGS=-mod=mod go install "$2@$3"
        touch "$stamp"
    fi
}

schemas() {
    [ -f "$SCHEMAS/.complete" ] && return 0
    echo "helm-check: fetching the Kubernetes $K8S_VERSION schemas (once)" >&2
    local tmp
    tmp="$(mktemp -d)"
    "$TOOLS/bin/pip" download -q --no-deps --dest "$tmp" "kubernetes-validate==1.37.0"
    echo "$SCHEMAS_SHA256  $tmp/$SCHEMAS_WHEEL" | sha256sum -c --quiet
    rm -rf "$SCHEMAS.partial" && mkdir -p "$SCHEMAS.partial"
    (cd "$tmp" && python3 -m zipfile -e "$SCHEMAS_WHEEL" unpacked)
    # Every kind the chart renders; one missing here fails the check (no
    # schema is not taken as valid).
    python3 "$ROOT/deploy/helm/standalone_schemas.py" \
        "$tmp/unpacked/kubernetes_validate/kubernetes-json-schema/v$K8S_VERSION-local-strict" \
        "$SCHEMAS.partial" \
        deployment-apps-v1.json service-v1.json configmap-v1.json secret-v1.json \
        persistentvolumeclaim-v1.json horizontalpodautoscaler-autoscaling-v2.json \
        poddisruptionbudget-policy-v1.json
    touch "$SCHEMAS.partial/.complete"
    rm -rf "$SCHEMAS" && mv "$SCHEMAS.partial" "$SCHEMAS"
    rm -rf "$tmp"
}

mkdir -p "$GOBIN"
tool helm helm.sh/helm/v4/cmd/helm "$HELM_VERSION"
tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"
schemas

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$GOBIN/helm" lint --strict "$CHART"
"$GOBIN/helm" template marie "$CHART" --kube-version "$K8S_VERSION" >"$out/default.yaml"
"$GOBIN/helm" template marie "$CHART" --kube-version "$K8S_VERSION" \
    --set services.gateway.autoscaling.enabled=false \
    --set services.providers.autoscaling.enabled=false \
    --set services.auth.autoscaling.enabled=false \
    --set services.memory.autoscaling.enabled=false \
    --set secrets.existingSecret=my-keys --set ollama.enabled=false \
    --set secrets.openaiApiKey=unused >"$out/fixed.yaml"
"$GOBIN/kubeconform" -strict -summary -schema-location "$SCHEMAS/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
    "$out/default.yaml" "$out/fixed.yaml"
