#!/usr/bin/env bash
# Set up a Debian 12 machine for ferry, as root. Idempotent: a second run
# installs nothing new and finishes in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  qemu-system-x86 qemu-utils qemu-block-extra
  iproute2 iputils-ping e2fsprogs cpio busybox-static debootstrap kmod
  python3-venv ca-certificates
  nfs-ganesha nfs-ganesha-vfs rpcbind
  ffmpeg fonts-dejavu-core
  chromium groff-base systemd util-linux
  etcd-server etcd-client
  ovmf seabios fdisk extlinux syslinux-common grub-efi-amd64-bin grub-common mtools dosfstools
)

if [ "$(id -u)" != 0 ]; then
  echo "setup: must run as root (ferry creates bridges, taps and namespaces)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating the virtualenv .venv"
  python3 -m venv .venv
fi
stamp=.venv/.ferry-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing ferry and its Python dependencies into .venv"
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
echo "setup: ready"
