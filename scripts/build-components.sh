#!/usr/bin/env bash
# Idempotent: build (once, cached by version outside the repo) the real Kubernetes components the tests
# and `make demo-cluster` use: kube-apiserver, kubectl and kube-proxy from k8s.io/kubernetes, etcd and
# etcdctl, cnitool. Writes /var/cache/bpflb/components.env (KUBE_APISERVER=, KUBECTL=, KUBE_PROXY=, ETCD=,
# ETCDCTL=, CNITOOL=, absolute paths, and the versions) and prints it. With the binaries present it takes a
# few milliseconds.
# Run as root (it writes /var/cache); BPFLB_CACHE=DIR puts the cache elsewhere.
#
# One-time cost, measured on 2 cores with empty Go module and build caches (downloads included), while
# other tests ran on the machine: 4 min 35 s and 4 min 38 s in two runs; kube-apiserver + kubectl about
# 4 min 5-20 s, etcd and etcdctl 20-27 s, cnitool 1 s. A rebuild with warm Go caches (e.g. after a change
# of ldflags only) is about 10 s. kube-proxy alone: 17 s on a machine that had built kube-apiserver (they
# share most packages in the Go build cache), 3 min 5 s with an empty build cache (Go modules already downloaded).
# Disk: 0.8 GiB of Go modules (go env GOMODCACHE), 2.5 GiB of Go build cache (go env GOCACHE), 270 MiB of
# binaries in $CACHE/bin.
#
# etcd: Debian 12's etcd-server is 3.4.23. It does start and serve kube-apiserver v1.34.4 (checked), but it
# is below what v1.34 supports (kubeadm v1.34's MinExternalEtcdVersion is 3.5.24; the apiserver turns off
# watch progress requests for etcd < 3.4.31, etcd-io/etcd#17507), so we build the etcd that
# k8s.io/kubernetes v1.34.4 itself requires instead.
set -euo pipefail
K8S_VERSION=v1.34.4          # k8s.io/kubernetes; its staging modules (k8s.io/api, ...) at the matching v0.34.4
ETCD_VERSION=v3.6.4          # the etcd client/server version k8s.io/kubernetes v1.34.4 itself requires
CNI_VERSION=v1.3.0           # github.com/containernetworking/cni (cnitool)
CACHE=${BPFLB_CACHE:-/var/cache/bpflb}
export PATH=/usr/local/go/bin:$PATH CGO_ENABLED=0 GOFLAGS=-buildvcs=false
ldflags="-s -w"
# What the release build stamps in (hack/lib/version.sh), so `kubectl version` and GET /version say v1.34.4.
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
k8s_ldflags="$ldflags"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

k8s_dir=$CACHE/bin/kubernetes-$K8S_VERSION
etcd_dir=$CACHE/bin/etcd-$ETCD_VERSION
cni_dir=$CACHE/bin/cnitool-$CNI_VERSION
mkdir -p "$k8s_dir" "$etcd_dir" "$cni_dir" "$CACHE/src"
command -v go > /dev/null || { echo "build-components: Go not found (expected /usr/local/go/bin/go)" >&2; exit 1; }
# One builder at a time: a second run (two test runs starting together) waits, then finds the binaries.
exec 9> "$CACHE/.build.lock"
flock 9

# A build is complete when its stamp file holds the recipe it was built with (version and flags, written
# last); another recipe rebuilds. A newer Go toolchain alone does not.
fresh() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
step() { echo "build-components: $*"; t0=$SECONDS; }
done_step() { echo "build-components: ... $(( SECONDS - t0 )) s"; }

# k8s.io/kubernetes cannot be `go install`ed (its go.mod replaces each staging module with
# ./staging/src/...): a wrapper module that requires it and replaces each of those with its published v0.x.
# It imports every command built from it, so `go mod tidy` records all their dependencies; made again when
# a command is added (tools.go differs).
k8s_wrapper() {
  local src=$CACHE/src/k8s-wrapper-$K8S_VERSION tools
  tools=$(printf '//go:build tools\n\npackage tools\n\nimport (\n'; for c in "$@"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done; printf ')\n')
  mkdir -p "$src"
  [ -f "$src/go.sum" ] && [ "$(cat "$src/tools.go" 2> /dev/null)" = "$tools" ] && return
  (
    cd "$src"
    go mod download -json "k8s.io/kubernetes@$K8S_VERSION" > /dev/null
    gomod=$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod
    {
      echo "module bpflb.local/k8s-wrapper"
      echo
      echo "go 1.24.0"
      echo
      echo "require k8s.io/kubernetes $K8S_VERSION"
      echo
      echo "replace ("
      grep -E '=> ./staging/src/' "$gomod" | awk -v v="v0.${K8S_VERSION#v1.}" '{print "\t" $1 " => " $1 " " v}'
      echo ")"
    } > go.mod
    echo "$tools" > tools.go
    go mod tidy > /dev/null 2>&1 || go mod tidy
  )
}
k8s_build() {  # k8s_build CMD...: into $k8s_dir, renamed into place (a running old binary is not disturbed)
  local cmd
  for cmd in "$@"; do
    (cd "$CACHE/src/k8s-wrapper-$K8S_VERSION" &&
      go build -trimpath -ldflags "$k8s_ldflags" -o "$k8s_dir/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
    mv "$k8s_dir/$cmd.tmp" "$k8s_dir/$cmd"
  done
}
k8s_cmds=(kube-apiserver kubectl kube-proxy)

k8s_recipe="$K8S_VERSION $k8s_ldflags"
if ! fresh "$k8s_dir/.built" "$k8s_recipe"; then
  step "kube-apiserver and kubectl $K8S_VERSION (one time, several minutes)"
  k8s_wrapper "${k8s_cmds[@]}"
  k8s_build kube-apiserver kubectl
  echo "$k8s_recipe" > "$k8s_dir/.built"
  done_step
fi
# kube-proxy has its own stamp, so adding it did not rebuild the others. CGO_ENABLED=0 (exported above), as
# the release build makes it: it shells out to iptables/ip6tables/nft/ipset and talks netlink in pure Go.
if ! fresh "$k8s_dir/.built-kube-proxy" "$k8s_recipe"; then
  step "kube-proxy $K8S_VERSION"
  k8s_wrapper "${k8s_cmds[@]}"
  k8s_build kube-proxy
  echo "$k8s_recipe" > "$k8s_dir/.built-kube-proxy"
  done_step
fi

etcd_recipe="$ETCD_VERSION $ldflags"
if ! fresh "$etcd_dir/.built" "$etcd_recipe"; then
  step "etcd and etcdctl $ETCD_VERSION"
  # etcd's own go.mod has replace directives, so `go install pkg@version` refuses it: wrapper module.
  src=$CACHE/src/etcd-wrapper-$ETCD_VERSION
  mkdir -p "$src"
  (
    cd "$src"
    printf 'module bpflb.local/etcd-wrapper\n\ngo 1.24.0\n\nrequire (\n\tgo.etcd.io/etcd/server/v3 %s\n\tgo.etcd.io/etcd/etcdctl/v3 %s\n)\n' \
      "$ETCD_VERSION" "$ETCD_VERSION" > go.mod
    printf '//go:build tools\n\npackage tools\n\nimport (\n\t_ "go.etcd.io/etcd/server/v3"\n\t_ "go.etcd.io/etcd/etcdctl/v3"\n)\n' > tools.go
    go mod tidy > /dev/null 2>&1 || go mod tidy
    go build -trimpath -ldflags "$ldflags" -o "$etcd_dir/etcd.tmp" go.etcd.io/etcd/server/v3
    go build -trimpath -ldflags "$ldflags" -o "$etcd_dir/etcdctl.tmp" go.etcd.io/etcd/etcdctl/v3
    mv "$etcd_dir/etcd.tmp" "$etcd_dir/etcd"
    mv "$etcd_dir/etcdctl.tmp" "$etcd_dir/etcdctl"
  )
  echo "$etcd_recipe" > "$etcd_dir/.built"
  done_step
fi

cni_recipe="$CNI_VERSION $ldflags"
if ! fresh "$cni_dir/.built" "$cni_recipe"; then
  step "cnitool $CNI_VERSION"
  GOBIN=$cni_dir go install -trimpath -ldflags "$ldflags" "github.com/containernetworking/cni/cnitool@$CNI_VERSION"
  echo "$cni_recipe" > "$cni_dir/.built"
  done_step
fi

cat > "$CACHE/components.env.tmp" <<ENV
KUBE_APISERVER=$k8s_dir/kube-apiserver
KUBECTL=$k8s_dir/kubectl
KUBE_PROXY=$k8s_dir/kube-proxy
ETCD=$etcd_dir/etcd
ETCDCTL=$etcd_dir/etcdctl
CNITOOL=$cni_dir/cnitool
K8S_VERSION=$K8S_VERSION
ETCD_VERSION=$ETCD_VERSION
CNI_VERSION=$CNI_VERSION
ENV
mv "$CACHE/components.env.tmp" "$CACHE/components.env"
cat "$CACHE/components.env"
