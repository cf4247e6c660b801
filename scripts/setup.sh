#!/usr/bin/env bash
# Idempotent set-up of everything bpflb needs on a Debian machine (run as root):
# Debian packages (bcc, kernel headers, iproute2), the headers link bcc needs, bpffs, and the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in python3-bpfcc linux-headers-amd64 python3-venv iproute2 iputils-ping bpftool iptables nftables iperf3 \
           mmdebstrap buildah containerd runc containernetworking-plugins gcc libc6-dev openssl; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/build. Debian ships headers for its own kernel
# (6.1.x) only; this machine runs another, so point its modules directory at the installed headers.
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build" ]; then
  hdr=$(ls -d /lib/modules/6.1.*-amd64 2>/dev/null | sort -V | tail -n 1)
  [ -n "$hdr" ] || { echo "setup: no /lib/modules/6.1.*-amd64 after installing linux-headers-amd64" >&2; exit 1; }
  [ -L "/lib/modules/$kver" ] && rm -f "/lib/modules/$kver"
  if [ -d "/lib/modules/$kver" ]; then ln -sfn "$hdr/build" "/lib/modules/$kver/build"; else ln -sfn "$hdr" "/lib/modules/$kver"; fi
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.bpflb-deps
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q -e ".[test]"
  touch "$stamp"
fi
.venv/bin/python -c "import bcc, pyroute2, yaml, uvloop" || { echo "setup: python imports failed" >&2; exit 1; }
