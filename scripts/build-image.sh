#!/bin/sh
# Build the agent image without a registry: Debian's own tools make the root filesystem (mmdebstrap),
# Containerfile (FROM scratch) gives it its command and environment (buildah), and the result is one
# OCI archive that `k3s ctr images import` takes as it is.
#
#   scripts/build-image.sh [OUT.tar]          default: build/bpflb-<version>.tar
#
# Needs: mmdebstrap buildah (Debian packages), gcc and libc6-dev, python3 with pip; root; Debian's archive
# and PyPI (through pip on this machine; the root filesystem itself reaches nothing but Debian's archive).
# BPFLB_IMAGE overrides the reference (default: IMAGE below, the one manifests/daemonset.yaml names).
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml")
# localhost/: the kubelet finds an imported image by this name, and never pulls a look-alike from a
# public registry when it is missing (the pull fails instead). Keep in step with manifests/ and README.
IMAGE=${BPFLB_IMAGE:-localhost/bpflb:$VERSION}
OUT=${1:-$ROOT/build/bpflb-$VERSION.tar}
SUITE=bookworm   # the release the project is developed and tested on: same python3-bpfcc, same Python
# Runtime packages only. bcc (python3-bpfcc) compiles bpf/ on the node against the host's kernel headers,
# which the DaemonSet mounts; iptables/nftables read and remove kube-proxy's leftovers.
PACKAGES=python3,python3-venv,python3-bpfcc,iptables,nftables,ca-certificates

work=$(mktemp -d /var/tmp/bpflb-image.XXXXXX)
trap 'rm -rf "$work"' EXIT INT TERM
mkdir -p "$(dirname "$OUT")" "$work/ctx" "$work/src"

# The CNI launcher: static, built here with the project's own flags (the image carries no compiler).
PYTHONPATH=$ROOT python3 -c "from lb.cni.install import build_launcher; build_launcher('$work/src/bpflb-cni')"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/lb" "$ROOT/bpf" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
# bpflb and its PyPI dependencies as wheels, fetched here with this machine's pip settings (index, CA):
# the root filesystem installs them offline. Wheels for CPython 3.11, the Python of $SUITE.
python3 -m pip wheel --quiet --wheel-dir "$work/src/wheels" "$work/src"

# The root filesystem. The venv sees Debian's bcc (--system-site-packages); pip installs the rest of
# pyproject.toml's dependencies; /opt/bpflb/share holds bpf/ and the launcher (ENV in Containerfile).
mmdebstrap --variant=minbase --include="$PACKAGES" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook="copy-in $work/src /tmp" \
  --customize-hook='chroot "$1" python3 -m venv --system-site-packages /opt/bpflb' \
  --customize-hook='chroot "$1" env -i PATH=/usr/bin:/bin /opt/bpflb/bin/pip install --no-index --find-links /tmp/src/wheels \
                      --no-cache-dir --disable-pip-version-check bpflb' \
  --customize-hook='chroot "$1" env -i PATH=/usr/bin:/bin /opt/bpflb/bin/pip freeze --disable-pip-version-check \
                      > "$1/opt/bpflb/requirements.lock"' \
  --customize-hook='mkdir -p "$1/opt/bpflb/share" && cp -r "$1/tmp/src/bpf" "$1/opt/bpflb/share/bpf"' \
  --customize-hook='install -m 0755 "$1/tmp/src/bpflb-cni" "$1/opt/bpflb/share/bpflb-cni" && rm -rf "$1/tmp/src"' \
  --customize-hook='rm -rf "$1/var/cache/apt/"* "$1/var/lib/apt/lists/"*' \
  "$SUITE" "$work/ctx/rootfs.tar"

# The image: Containerfile adds the root filesystem and sets the command. buildah keeps its store in
# the work directory (vfs: no overlay mounts needed), so nothing is left on the build machine.
cp "$ROOT/Containerfile" "$work/ctx/Containerfile"
store="--root $work/store --runroot $work/run --storage-driver vfs"
# shellcheck disable=SC2086
buildah $store build --quiet --layers=false --isolation chroot -f "$work/ctx/Containerfile" -t "$IMAGE" "$work/ctx" >/dev/null
# shellcheck disable=SC2086
buildah $store push --quiet "$IMAGE" "oci:$work/layout:${IMAGE##*:}"
# shellcheck disable=SC2086
buildah $store rmi --all >/dev/null

# containerd names an imported image by the index's io.containerd.image.name; without it `ctr images
# import` would keep the image under an "import-<date>" name the kubelet never asks for.
python3 - "$work/layout/index.json" "$IMAGE" <<'EOF'
import json, sys
path, image = sys.argv[1], sys.argv[2]
with open(path) as f:
    index = json.load(f)
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = image
with open(path, "w") as f:
    json.dump(index, f)
EOF
tar --sort=name --owner=0 --group=0 --numeric-owner -C "$work/layout" -cf "$OUT.part" .
mv "$OUT.part" "$OUT"
echo "$IMAGE -> $OUT ($(du -h "$OUT" | cut -f1))"
