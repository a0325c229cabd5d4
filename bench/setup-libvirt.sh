#!/usr/bin/env bash
# Optional: what the benchmark's libvirt rows need (bench/migbench/libvirt_rig.py).
# The main set-up (scripts/setup.sh) never installs libvirt. Run as root, once.
#
# It installs libvirt's daemon, QEMU driver and virsh from Debian, with no
# recommends: no system libvirtd is configured or started. The bench starts
# its own two libvirtd's, one in each lab host's namespaces, and ends them.
set -euo pipefail

if [[ $EUID -ne 0 ]]; then
    echo "setup-libvirt.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients >/dev/null

# libvirtd's QEMU driver refuses to start unless its compiled-in user exists,
# even when qemu.conf runs QEMU as root (libvirt-daemon-system would add it,
# along with a system daemon we do not want).
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /var/lib/libvirt \
        --shell /usr/sbin/nologin libvirt-qemu
fi

# Mount points: each bench libvirtd binds its own directories over these.
mkdir -p /etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt

echo "libvirt for the bench: $(libvirtd --version)"
