#!/usr/bin/env bash
# Idempotent: build (once, cached outside the repo) the container images a node and the upstream e2e tests
# in scope (Services, networking, EndpointSlices) need, without a registry, as OCI archives that
# `ctr -n k8s.io images import` takes as they are and lists under the exact upstream names, so the kubelet
# finds them and never pulls:
#
#   pause.tar    registry.k8s.io/pause:3.10.1                   pause.c of k8s.io/kubernetes, static gcc
#   agnhost.tar  registry.k8s.io/e2e-test-images/agnhost:2.56   agnhost + the tools the e2e tests exec
#   coredns.tar  registry.k8s.io/coredns/coredns:v1.12.1        scripts/build-components.sh's CoreDNS
#   nginx.tar    registry.k8s.io/e2e-test-images/nginx:1.14-4   Debian's nginx-light (EndpointSlice tests)
#
# into /var/cache/bpflb/images/, and writes /var/cache/bpflb/images.env (PAUSE_IMAGE=, PAUSE_TAR=,
# AGNHOST_IMAGE=, AGNHOST_TAR=, COREDNS_IMAGE=, COREDNS_TAR=, NGINX_IMAGE=, NGINX_TAR=) and prints it.
# Each image has a stamp holding its recipe (reference, recipe files, input binaries' size and mtime);
# with all stamps fresh a run takes a few tens of milliseconds.
#
# Runs `scripts/build-components.sh --node` first (agnhost and coredns come from there).
# Needs: root, mmdebstrap buildah (Debian packages), gcc and libc6-dev, python3, Debian's archive.
# BPFLB_CACHE=DIR puts the cache elsewhere.
#
# Measured on 2 cores while other tests ran, Go components already built: 1 min 32 s in all (pause 0.3 s,
# agnhost 42 s and nginx 48 s, mostly mmdebstrap fetching and unpacking Debian packages, coredns 1.5 s);
# a second run 0.13 s. Archives: pause 0.3 MiB, agnhost 97 MiB, coredns 16 MiB, nginx 46 MiB.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${BPFLB_CACHE:-/var/cache/bpflb}
OUT=$CACHE/images
RECIPES=$ROOT/scripts/images
SUITE=bookworm
export PATH=/usr/local/go/bin:$PATH

"$ROOT/scripts/build-components.sh" --node > /dev/null
declare -A comp
while IFS='=' read -r k v; do comp[$k]=$v; done < "$CACHE/components.env"

mkdir -p "$OUT"
exec 9> "$OUT/.build.lock"
flock 9

fresh() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
# What an image is made from: its reference, this script and its Containerfile (small files, hashed), and
# the binaries it takes (large: size and mtime, which a rebuild changes; renamed into place, never edited).
recipe() {  # recipe REF FILE... -- BINARY...
  local ref=$1; shift
  local small=() big=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do small+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  big=("$@")
  echo "$ref"
  sha256sum "$0" "${small[@]}" | cut -d' ' -f1
  [ ${#big[@]} -eq 0 ] || stat -c '%n %s %Y' "${big[@]}"
}

# The Debian root filesystems: minbase, no docs, no apt lists; $3... are extra customize hooks.
debian_rootfs() {  # debian_rootfs OUT.tar PACKAGES [HOOK...]
  local out=$1 packages=$2; shift 2
  local hooks=()
  for h in "$@"; do hooks+=(--customize-hook="$h"); done
  mmdebstrap --quiet --variant=minbase --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    "${hooks[@]}" \
    --customize-hook='rm -rf "$1/var/cache/apt/"* "$1/var/lib/apt/lists/"* "$1/var/log/"*.log' \
    "$SUITE" "$out" < /dev/null
}

# build_image NAME REF CONTEXT: Containerfile scripts/images/NAME.Containerfile on CONTEXT -> $OUT/NAME.tar.
# buildah keeps its store in a temporary directory (vfs: no overlay mounts), so nothing stays behind.
# containerd names an imported image by the index's io.containerd.image.name annotation; without it
# `ctr images import` would keep the image under a name the kubelet never asks for.
build_image() {
  local name=$1 ref=$2 ctx=$3 tmp=$3/.oci
  local store=(--root "$ctx/.store" --runroot "$ctx/.run" --storage-driver vfs)
  cp "$RECIPES/$name.Containerfile" "$ctx/Containerfile"
  buildah "${store[@]}" build --quiet --layers=false --isolation chroot -f "$ctx/Containerfile" -t "$ref" "$ctx" > /dev/null
  buildah "${store[@]}" push --quiet "$ref" "oci:$tmp:${ref##*:}"
  buildah "${store[@]}" rmi --all > /dev/null
  python3 - "$tmp/index.json" "$ref" <<'EOF'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
with open(path) as f:
    index = json.load(f)
for m in index["manifests"]:
    m["annotations"] = {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1]}
with open(path, "w") as f:
    json.dump(index, f)
EOF
  tar --sort=name --owner=0 --group=0 --numeric-owner -C "$tmp" -cf "$OUT/$name.tar.part" .
  mv "$OUT/$name.tar.part" "$OUT/$name.tar"
}

work=$(mktemp -d /var/tmp/bpflb-node-images.XXXXXX)
trap 'rm -rf "$work"' EXIT INT TERM
step() { echo "build-node-images: $1 ..."; t0=$EPOCHREALTIME; }
done_step() {
  local us=$(( ${EPOCHREALTIME/./} - ${t0/./} ))
  echo "build-node-images: ... $1 $(du -h "$OUT/$1.tar" | cut -f1), $(( us / 1000000 )).$(( us / 100000 % 10 )) s"
}

k8s_src=$(go env GOMODCACHE)/k8s.io/kubernetes@${comp[K8S_VERSION]}
[ -d "$k8s_src" ] || (cd "$CACHE/src" && go mod download "k8s.io/kubernetes@${comp[K8S_VERSION]}")

# ---- pause ------------------------------------------------------------------------------------------
PAUSE_IMAGE=registry.k8s.io/pause:3.10.1
pause_c=$k8s_src/build/pause/linux/pause.c
r=$(recipe "$PAUSE_IMAGE" "$RECIPES/pause.Containerfile" "$pause_c")
if ! fresh "$OUT/.built-pause" "$r"; then
  step "pause"
  mkdir -p "$work/pause"
  # Upstream's flags (build/pause/Makefile); VERSION names this build instead of a git describe.
  gcc -Os -Wall -Werror -static -DVERSION="v${PAUSE_IMAGE##*:}-bpflb" -o "$work/pause/pause" "$pause_c"
  strip "$work/pause/pause"
  build_image pause "$PAUSE_IMAGE" "$work/pause"
  echo "$r" > "$OUT/.built-pause"
  done_step pause
fi

# ---- agnhost ----------------------------------------------------------------------------------------
# The tools upstream's alpine image adds (bind-tools curl netcat-openbsd iproute2 iperf bash), plus what
# alpine's busybox gave and the tests in scope exec in these pods: wget (`wget -T 5 -qO-`), nslookup (in
# bind9-dnsutils), nc -v -t/-u -w, curl, sh, dd, sleep, timeout, test, hostname.
AGNHOST_IMAGE=registry.k8s.io/e2e-test-images/agnhost:2.56
AGNHOST_PACKAGES=bash,curl,netcat-openbsd,bind9-dnsutils,iproute2,iperf,wget,ca-certificates,hostname
r=$(recipe "$AGNHOST_IMAGE $AGNHOST_PACKAGES" "$RECIPES/agnhost.Containerfile" \
      "$k8s_src/test/images/agnhost/porter/localhost.crt" -- "${comp[AGNHOST]}" "${comp[COREDNS]}")
if ! fresh "$OUT/.built-agnhost" "$r"; then
  step "agnhost"
  mkdir -p "$work/agnhost"
  # As upstream's Dockerfile: iperf also in /usr/local/bin, /uploads for netexec, /agnhost-2 -> agnhost
  # (entrypoint-tester), user-defined-in-image (uid 1000) in group-defined-in-image (gid 50000).
  debian_rootfs "$work/agnhost/rootfs.tar" "$AGNHOST_PACKAGES" \
    'ln -s /usr/bin/iperf "$1/usr/local/bin/iperf"' \
    'mkdir "$1/uploads" && ln -s agnhost "$1/agnhost-2"' \
    'chroot "$1" useradd -m -u 1000 -s /bin/sh user-defined-in-image' \
    'chroot "$1" groupadd -g 50000 group-defined-in-image' \
    'chroot "$1" usermod -a -G group-defined-in-image user-defined-in-image'
  cp "$k8s_src/test/images/agnhost/porter/localhost.crt" "$k8s_src/test/images/agnhost/porter/localhost.key" \
    "${comp[AGNHOST]}" "${comp[COREDNS]}" "$work/agnhost/"
  chmod u+w "$work/agnhost/"*  # the Go module cache is read-only
  build_image agnhost "$AGNHOST_IMAGE" "$work/agnhost"
  echo "$r" > "$OUT/.built-agnhost"
  done_step agnhost
fi

# ---- coredns ----------------------------------------------------------------------------------------
COREDNS_IMAGE=registry.k8s.io/coredns/coredns:${comp[COREDNS_VERSION]}
r=$(recipe "$COREDNS_IMAGE" "$RECIPES/coredns.Containerfile" -- "${comp[COREDNS]}")
if ! fresh "$OUT/.built-coredns" "$r"; then
  step "coredns"
  d=$work/coredns/root
  mkdir -p "$d/etc/ssl/certs" "$d/tmp" "$d/home/nonroot"
  chmod 1777 "$d/tmp"
  install -m 0755 "${comp[COREDNS]}" "$d/coredns"
  # cap_net_bind_service=+ep, as upstream's `setcap` leaves it (struct vfs_cap_data, revision 2).
  python3 -c 'import os, struct, sys; os.setxattr(sys.argv[1], "security.capability", struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0))' "$d/coredns"
  # distroless's users and the CA bundle (the kubernetes plugin reads the service account's CA itself).
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$d/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$d/etc/group"
  chown 65532:65532 "$d/home/nonroot"
  [ ! -f /etc/ssl/certs/ca-certificates.crt ] || cp /etc/ssl/certs/ca-certificates.crt "$d/etc/ssl/certs/"
  tar --xattrs --xattrs-include=security.capability --sort=name --numeric-owner -C "$d" -cf "$work/coredns/rootfs.tar" .
  build_image coredns "$COREDNS_IMAGE" "$work/coredns"
  echo "$r" > "$OUT/.built-coredns"
  done_step coredns
fi

# ---- nginx ------------------------------------------------------------------------------------------
NGINX_IMAGE=registry.k8s.io/e2e-test-images/nginx:1.14-4
r=$(recipe "$NGINX_IMAGE" "$RECIPES/nginx.Containerfile")
if ! fresh "$OUT/.built-nginx" "$r"; then
  step "nginx"
  mkdir -p "$work/nginx"
  # One plain server on port 80 (Debian's default site also listens on [::]:80, which fails in a pod
  # without IPv6); logs to the container's output, as the upstream image links them.
  debian_rootfs "$work/nginx/rootfs.tar" nginx-light \
    'printf "server {\n\tlisten 80 default_server;\n\troot /var/www/html;\n\tindex index.html index.nginx-debian.html;\n}\n" > "$1/etc/nginx/sites-available/default"' \
    'ln -sf /dev/stdout "$1/var/log/nginx/access.log" && ln -sf /dev/stderr "$1/var/log/nginx/error.log"'
  build_image nginx "$NGINX_IMAGE" "$work/nginx"
  echo "$r" > "$OUT/.built-nginx"
  done_step nginx
fi

cat > "$CACHE/images.env.tmp" <<ENV
PAUSE_IMAGE=$PAUSE_IMAGE
PAUSE_TAR=$OUT/pause.tar
AGNHOST_IMAGE=$AGNHOST_IMAGE
AGNHOST_TAR=$OUT/agnhost.tar
COREDNS_IMAGE=$COREDNS_IMAGE
COREDNS_TAR=$OUT/coredns.tar
NGINX_IMAGE=$NGINX_IMAGE
NGINX_TAR=$OUT/nginx.tar
ENV
mv "$CACHE/images.env.tmp" "$CACHE/images.env"
cat "$CACHE/images.env"
