"""Whether a disk's cache mode is safe to live-migrate, from the file system it is on.

With a cache mode that keeps data in the host's page cache (writeback,
writethrough, unsafe), the source's last writes and the target's first reads
go through two hosts' page caches. On a file system shared between hosts but
not coherent between them (NFS, CIFS, CephFS, FUSE file systems), the target
can read stale blocks that the source has already rewritten: libvirt refuses
such a migration unless told ``--unsafe``, and so does ferry. ``cache=none``
(O_DIRECT) bypasses the page cache. Cluster file systems (GFS2, OCFS2) keep
their caches coherent. A local file system seen by two "hosts" is one kernel's
page cache (the lab). A URL disk is opened by QEMU's own network driver, which
keeps no page cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from ferry.domain.disks import DIRECT_CACHE_MODES, DiskSpec

# Shared between hosts, page caches not coherent between them.
NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "9p", "afs", "glusterfs", "lustre",
     "gpfs", "beegfs", "ncpfs", "davfs", "sshfs"}
)  # fmt: skip
# Shared and coherent: every node's cache follows the cluster's locks.
CLUSTER_FS = frozenset({"gfs2", "ocfs2"})
MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def fs_type(path: str, mountinfo: str | None = None) -> str:
    """The type of the file system ``path`` lies on (its deepest mount point)."""
    text = MOUNTINFO.read_text() if mountinfo is None else mountinfo
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mount = _unescape(fields[4])
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, right.split()[0]
    return kind


def is_network_fs(kind: str) -> bool:
    return kind in NETWORK_FS or kind.startswith("fuse")


def migration_hazard(disk: DiskSpec, mountinfo: str | None = None) -> str | None:
    """Why live-migrating ``disk`` could lose or corrupt data; None when it is safe."""
    if disk.is_url or not disk.writable or disk.cache_mode in DIRECT_CACHE_MODES:
        return None
    kind = fs_type(disk.path, mountinfo)
    if kind in CLUSTER_FS or not is_network_fs(kind):
        return None
    return (
        f"disk {disk.path} uses cache={disk.cache_mode} on {kind}, whose page cache is not "
        "coherent between hosts: the target could read blocks the source has rewritten "
        '(use cache = "none", or migrate with --unsafe)'
    )
