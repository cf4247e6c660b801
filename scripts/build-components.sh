#!/usr/bin/env bash
# Idempotent: build (once, cached by version outside the repo) the real Kubernetes components the tests
# and `make demo-cluster` use: kube-apiserver, kubectl and kube-proxy from k8s.io/kubernetes, etcd and
# etcdctl, cnitool. Writes /var/cache/bpflb/components.env (KUBE_APISERVER=, KUBECTL=, KUBE_PROXY=, ETCD=,
# ETCDCTL=, CNITOOL=, absolute paths, and the versions) and prints it. With the binaries present it takes a
# few milliseconds.
#
#   scripts/build-components.sh           the above
#   scripts/build-components.sh --node    also what a whole node and the upstream e2e suite need: kubelet,
#                                         kube-controller-manager, kube-scheduler, agnhost, e2e.test (all from
#                                         k8s.io/kubernetes) and CoreDNS; components.env gains KUBELET=,
#                                         KUBE_CONTROLLER_MANAGER=, KUBE_SCHEDULER=, AGNHOST=, E2E_TEST=,
#                                         COREDNS= (each listed once built, with or without --node)
# Run as root (it writes /var/cache); BPFLB_CACHE=DIR puts the cache elsewhere.
#
# One-time cost, measured on 2 cores with empty Go module and build caches (downloads included), while
# other tests ran on the machine: 4 min 35 s and 4 min 38 s in two runs; kube-apiserver + kubectl about
# 4 min 5-20 s, etcd and etcdctl 20-27 s, cnitool 1 s. A rebuild with warm Go caches (e.g. after a change
# of ldflags only) is about 10 s. kube-proxy alone: 17 s on a machine that had built kube-apiserver (they
# share most packages in the Go build cache), 3 min 5 s with an empty build cache (Go modules already downloaded).
# --node on top of that, measured the same way: kubelet 36 s, kube-controller-manager 24 s, kube-scheduler
# 4 s, agnhost 3 s, e2e.test 2 min 36 s (with the Go modules downloaded and the Go build cache holding what
# kube-apiserver, kubectl and kube-proxy share with them); 3-5 s each when the build cache holds them (a
# change of ldflags only); CoreDNS 60 s (its modules downloaded and compiled, nothing cached).
# Disk: 0.8 GiB of Go modules (go env GOMODCACHE), 2.5 GiB of Go build cache (go env GOCACHE), 270 MiB of
# binaries in $CACHE/bin; with --node about 1.1 GiB, 4.2 GiB and 700 MiB.
#
# etcd: Debian 12's etcd-server is 3.4.23. It does start and serve kube-apiserver v1.34.4 (checked), but it
# is below what v1.34 supports (kubeadm v1.34's MinExternalEtcdVersion is 3.5.24; the apiserver turns off
# watch progress requests for etcd < 3.4.31, etcd-io/etcd#17507), so we build the etcd that
# k8s.io/kubernetes v1.34.4 itself requires instead.
set -euo pipefail
K8S_VERSION=v1.34.4          # k8s.io/kubernetes; its staging modules (k8s.io/api, ...) at the matching v0.34.4
ETCD_VERSION=v3.6.4          # the etcd client/server version k8s.io/kubernetes v1.34.4 itself requires
CNI_VERSION=v1.3.0           # github.com/containernetworking/cni (cnitool)
COREDNS_VERSION=v1.12.1      # github.com/coredns/coredns, the one kubeadm v1.34 deploys
# CoreDNS's plugins, in the order they run (upstream plugin.cfg's order): what a cluster's kube-dns needs and
# nothing that reaches outside the node (no forward, no cloud DNS back ends). Upstream's Corefile for
# kubeadm also names forward; a Corefile for this CoreDNS must not.
COREDNS_PLUGINS="reload ready health prometheus errors log loadbalance cache hosts kubernetes loop"
CACHE=${BPFLB_CACHE:-/var/cache/bpflb}
node=false
for arg in "$@"; do
  case $arg in
    --node) node=true ;;
    *) echo "usage: $0 [--node]" >&2; exit 2 ;;
  esac
done
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
coredns_dir=$CACHE/bin/coredns-$COREDNS_VERSION
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
# It imports every package built from it, so `go mod tidy` records all their dependencies. It only grows:
# made again when a package is asked for that tools.go lacks (so a plain run after --node keeps the larger
# one, and --node after a plain run adds its packages).
k8s_wrapper() {  # k8s_wrapper PKG...
  local src=$CACHE/src/k8s-wrapper-$K8S_VERSION tools pkg missing=false
  mkdir -p "$src"
  for pkg in "$@"; do
    grep -qxF "$(printf '\t_ "%s"' "$pkg")" "$src/tools.go" 2> /dev/null || missing=true
  done
  [ -f "$src/go.sum" ] && ! $missing && return
  tools=$(
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    { sed -n 's/^\t_ "\(.*\)"$/\1/p' "$src/tools.go" 2> /dev/null || true; printf '%s\n' "$@"; } |
      awk '!seen[$0]++ { printf "\t_ \"%s\"\n", $0 }'
    printf ')\n'
  )
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
k8s_build() {  # k8s_build NAME PKG: into $k8s_dir/NAME, renamed into place (a running old binary is not disturbed)
  (cd "$CACHE/src/k8s-wrapper-$K8S_VERSION" && go build -trimpath -ldflags "$k8s_ldflags" -o "$k8s_dir/$1.tmp" "$2")
  mv "$k8s_dir/$1.tmp" "$k8s_dir/$1"
}
k8s_pkgs=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kube-proxy)

k8s_recipe="$K8S_VERSION $k8s_ldflags"
if ! fresh "$k8s_dir/.built" "$k8s_recipe"; then
  step "kube-apiserver and kubectl $K8S_VERSION (one time, several minutes)"
  k8s_wrapper "${k8s_pkgs[@]}"
  k8s_build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
  k8s_build kubectl k8s.io/kubernetes/cmd/kubectl
  echo "$k8s_recipe" > "$k8s_dir/.built"
  done_step
fi
# kube-proxy has its own stamp, so adding it did not rebuild the others. CGO_ENABLED=0 (exported above), as
# the release build makes it: it shells out to iptables/ip6tables/nft/ipset and talks netlink in pure Go.
if ! fresh "$k8s_dir/.built-kube-proxy" "$k8s_recipe"; then
  step "kube-proxy $K8S_VERSION"
  k8s_wrapper "${k8s_pkgs[@]}"
  k8s_build kube-proxy k8s.io/kubernetes/cmd/kube-proxy
  echo "$k8s_recipe" > "$k8s_dir/.built-kube-proxy"
  done_step
fi

# --node: each with its own stamp, like kube-proxy. All CGO_ENABLED=0; the release build makes kubelet with
# cgo, which it needs for nothing used here (a static kubelet runs anywhere, as kind's and k3s's do).
# e2e.test is `go test -c` of test/e2e: the wrapper also imports what e2e_test.go imports (the test
# sources and the framework's init packages), which `go mod tidy` does not follow in a dependency.
node_cmds=(kubelet kube-controller-manager kube-scheduler)
if $node; then
  e2e_test_go=$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/test/e2e/e2e_test.go
  node_pkgs=("${k8s_pkgs[@]}" "${node_cmds[@]/#/k8s.io/kubernetes/cmd/}" k8s.io/kubernetes/test/images/agnhost
             k8s.io/kubernetes/test/e2e)
  for cmd in "${node_cmds[@]}" agnhost e2e.test; do
    fresh "$k8s_dir/.built-$cmd" "$k8s_recipe" && continue
    step "$cmd $K8S_VERSION"
    [ -f "$e2e_test_go" ] || (cd "$CACHE/src" && go mod download "k8s.io/kubernetes@$K8S_VERSION")
    # The non-standard-library imports of e2e_test.go (a dot in the first path element).
    mapfile -t e2e_imports < <(sed -n '/^import (/,/^)/p' "$e2e_test_go" | grep -oE '"[^"/]+\.[^"]*"' | tr -d '"')
    k8s_wrapper "${node_pkgs[@]}" "${e2e_imports[@]}"
    case $cmd in
      agnhost) k8s_build agnhost k8s.io/kubernetes/test/images/agnhost ;;
      e2e.test)
        (cd "$CACHE/src/k8s-wrapper-$K8S_VERSION" &&
          go test -c -trimpath -ldflags "$k8s_ldflags" -o "$k8s_dir/e2e.test.tmp" k8s.io/kubernetes/test/e2e)
        mv "$k8s_dir/e2e.test.tmp" "$k8s_dir/e2e.test" ;;
      *) k8s_build "$cmd" "k8s.io/kubernetes/cmd/$cmd" ;;
    esac
    echo "$k8s_recipe" > "$k8s_dir/.built-$cmd"
    done_step
  done
fi

# CoreDNS with only $COREDNS_PLUGINS: a wrapper main that sets the directive list and runs coremain, as
# upstream's generated core/plugin/zplugin.go + core/dnsserver/zdirectives.go do for plugin.cfg.
coredns_recipe="$COREDNS_VERSION $ldflags $COREDNS_PLUGINS"
if $node && ! fresh "$coredns_dir/.built" "$coredns_recipe"; then
  step "coredns $COREDNS_VERSION ($COREDNS_PLUGINS)"
  src=$CACHE/src/coredns-wrapper-$COREDNS_VERSION
  mkdir -p "$src" "$coredns_dir"
  (
    cd "$src"
    printf 'module bpflb.local/coredns-wrapper\n\ngo 1.24.0\n\nrequire github.com/coredns/coredns %s\n' \
      "$COREDNS_VERSION" > go.mod
    go mod download "github.com/coredns/coredns@$COREDNS_VERSION"
    # Each directive's package, from upstream's plugin.cfg (name:package; prometheus is plugin/metrics).
    cfg=$(go env GOMODCACHE)/github.com/coredns/coredns@$COREDNS_VERSION/plugin.cfg
    {
      printf '// CoreDNS with a fixed plugin set (made by scripts/build-components.sh).\npackage main\n\nimport (\n'
      printf '\t"github.com/coredns/coredns/core/dnsserver"\n\t"github.com/coredns/coredns/coremain"\n\n'
      for p in $COREDNS_PLUGINS; do
        pkg=$(awk -F: -v d="$p" '$1 == d { print $2 }' "$cfg")
        [ -n "$pkg" ] || { echo "build-components: CoreDNS has no plugin $p" >&2; exit 1; }
        case $pkg in */*) ;; *) pkg=github.com/coredns/coredns/plugin/$pkg ;; esac
        printf '\t_ "%s"\n' "$pkg"
      done
      printf ')\n\nfunc init() {\n\tdnsserver.Directives = []string{\n'
      for p in $COREDNS_PLUGINS; do printf '\t\t"%s",\n' "$p"; done
      printf '\t}\n}\n\nfunc main() { coremain.Run() }\n'
    } > main.go
    go mod tidy > /dev/null 2>&1 || go mod tidy
    go build -trimpath -ldflags "$ldflags" -o "$coredns_dir/coredns.tmp" .
    mv "$coredns_dir/coredns.tmp" "$coredns_dir/coredns"
  )
  echo "$coredns_recipe" > "$coredns_dir/.built"
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
for cmd in "${node_cmds[@]}" agnhost e2e.test; do
  if fresh "$k8s_dir/.built-$cmd" "$k8s_recipe"; then
    var=${cmd^^}; var=${var//[-.]/_}
    echo "$var=$k8s_dir/$cmd" >> "$CACHE/components.env.tmp"
  fi
done
if fresh "$coredns_dir/.built" "$coredns_recipe"; then
  # No quotes in the file (its readers split at the first =): the plugin list comma-separated.
  printf 'COREDNS=%s\nCOREDNS_VERSION=%s\nCOREDNS_PLUGINS=%s\n' "$coredns_dir/coredns" "$COREDNS_VERSION" \
    "${COREDNS_PLUGINS// /,}" >> "$CACHE/components.env.tmp"
fi
mv "$CACHE/components.env.tmp" "$CACHE/components.env"
cat "$CACHE/components.env"
