"""The disks a --copy-storage migration makes on its target: made before its QEMU
starts, the migration's until the commit, removed if it aborts.

Each made path goes into the arriving domain's record as soon as the file
exists, so that an abort (or a restart of ferryd that finds the migration
never committed) removes exactly what was made here, and never a disk that
was already here: a made disk is linked into place only where no file was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from ferry.domain.disks import DiskSpec
from ferry.host.record import DomainRecord
from ferry.storage.new_disk import create_image, remove_new_disks

log = logging.getLogger("ferryd")


async def make_disks(
    record: DomainRecord, disks: Sequence[tuple[DiskSpec, int]], save: Callable[[], None]
) -> None:
    """Empty images of the source's sizes and formats; StorageError on the first failure.

    Each is recorded (``save``) once it exists, never before: a path in the
    record is one this host made, so removing it can only remove our copy.
    (A crash between the two leaves a file behind, never a loss.)
    """
    for disk, size in disks:
        assert disk.format is not None  # pinned in every migrating config
        await create_image(disk.path, disk.format, size)
        record.created_disks.append(disk.path)
        save()


def discard_disks(record: DomainRecord) -> None:
    """An arriving domain that will never run here: the disks made for it go."""
    if not record.created_disks:
        return
    for err in remove_new_disks(record.created_disks):
        log.error("domain %s: %s", record.config.name, err)
    log.info("domain %s: removed the copies begun here: %s", record.config.name,
             ", ".join(record.created_disks))  # fmt: skip
    record.created_disks = []
