#!/usr/bin/env bash
# Idempotent: build (once, cached by version outside the repo) the real Kubernetes components the tests
# and `make demo-cluster` use: kube-apiserver and kubectl from k8s.io/kubernetes, etcd and etcdctl, cnitool.
# Writes /var/cache/bpflb/components.env (KUBE_APISERVER=, KUBECTL=, ETCD=, ETCDCTL=, CNITOOL=, absolute
# paths) and prints it. A second run with the binaries present takes well under a second.
#
# One-time cost, measured (2 cores, empty Go module and build caches, from scratch):
#   WALLTIME_PLACEHOLDER
# Disk: about 0.8 GiB of Go modules (~/go/pkg/mod) and 2.5 GiB of Go build cache (~/.cache/go-build), 160 MiB
# of binaries here.
#
# etcd: Debian 12's etcd-server is 3.4.23. It does start and serve kube-apiserver v1.34.4 (checked), but it
# is below what v1.34 supports (kubeadm's MinExternalEtcdVersion is 3.5.24; the apiserver turns off watch
# progress requests for etcd < 3.4.31, etcd-io/etcd#17507), so we build the etcd that k8s.io/kubernetes
# itself requires instead.
set -euo pipefail
K8S_VERSION=v1.34.4          # k8s.io/kubernetes; staging modules are the matching v0.34.4
ETCD_VERSION=v3.6.4          # the etcd client/server version k8s.io/kubernetes v1.34.4 itself requires
CNI_VERSION=v1.3.0           # github.com/containernetworking/cni (cnitool)
CACHE=${BPFLB_CACHE:-/var/cache/bpflb}
export PATH=/usr/local/go/bin:$PATH CGO_ENABLED=0 GOFLAGS=-buildvcs=false
ldflags="-s -w"

k8s_dir=$CACHE/bin/kubernetes-$K8S_VERSION
etcd_dir=$CACHE/bin/etcd-$ETCD_VERSION
cni_dir=$CACHE/bin/cnitool-$CNI_VERSION
mkdir -p "$k8s_dir" "$etcd_dir" "$cni_dir" "$CACHE/src"
command -v go > /dev/null || { echo "build-components: Go not found (expected /usr/local/go/bin/go)" >&2; exit 1; }
# One builder at a time (two test runs starting together wait for the first to finish the build).
exec 9> "$CACHE/.build.lock"
flock 9

if [ ! -x "$k8s_dir/kube-apiserver" ] || [ ! -x "$k8s_dir/kubectl" ]; then
  echo "build-components: kube-apiserver and kubectl $K8S_VERSION (one time, several minutes)"
  src=$CACHE/src/k8s-wrapper-$K8S_VERSION
  mkdir -p "$src"
  staging_v="v0.${K8S_VERSION#v1.}"
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
      # k8s.io/kubernetes replaces each staging module with ./staging/...: use the published v0.x instead.
      grep -E '=> ./staging/src/' "$gomod" | awk -v v="$staging_v" '{print "\t" $1 " => " $1 " " v}'
      echo ")"
    } > go.mod
    cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
    go mod tidy > /dev/null 2>&1 || go mod tidy
    go build -trimpath -ldflags "$ldflags" -o "$k8s_dir/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
    mv "$k8s_dir/kube-apiserver.tmp" "$k8s_dir/kube-apiserver"
    go build -trimpath -ldflags "$ldflags" -o "$k8s_dir/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl
    mv "$k8s_dir/kubectl.tmp" "$k8s_dir/kubectl"
  )
fi

if [ ! -x "$etcd_dir/etcd" ] || [ ! -x "$etcd_dir/etcdctl" ]; then
  echo "build-components: etcd $ETCD_VERSION"
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
fi

if [ ! -x "$cni_dir/cnitool" ]; then
  echo "build-components: cnitool $CNI_VERSION"
  GOBIN=$cni_dir go install -trimpath -ldflags "$ldflags" "github.com/containernetworking/cni/cnitool@$CNI_VERSION"
fi

cat > "$CACHE/components.env.tmp" <<ENV
KUBE_APISERVER=$k8s_dir/kube-apiserver
KUBECTL=$k8s_dir/kubectl
ETCD=$etcd_dir/etcd
ETCDCTL=$etcd_dir/etcdctl
CNITOOL=$cni_dir/cnitool
K8S_VERSION=$K8S_VERSION
ETCD_VERSION=$ETCD_VERSION
CNI_VERSION=$CNI_VERSION
ENV
mv "$CACHE/components.env.tmp" "$CACHE/components.env"
cat "$CACHE/components.env"
