"""The disks a --copy-storage migration makes on its target: made before its QEMU
starts, the migration's until the commit, removed if it aborts.

Each made disk goes into the arriving domain's record as soon as the file
exists, with its identity (device and inode), so that an abort (or a restart
of ferryd that finds the migration never committed) removes exactly the file
made here, and never a disk that was already here or came later: a made disk
is linked into place only where no file was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from ferry.domain.disks import DiskSpec
from ferry.errors import StorageError
from ferry.host.record import DomainRecord
from ferry.storage.new_disk import create_image, remove_made_disk

log = logging.getLogger("ferryd")


async def make_disks(
    record: DomainRecord, disks: Sequence[tuple[DiskSpec, int, str]], save: Callable[[], None]
) -> None:
    """Empty images of the source's sizes and formats at their real paths; StorageError on
    the first failure.

    Each is recorded (``save``) once it exists, never before: a disk in the
    record is one this host made, so removing it can only remove our copy.
    (A crash between the two leaves a file behind, never a loss.)
    """
    for disk, size, real in disks:
        assert disk.format is not None  # pinned in every migrating config
        made = await create_image(real, disk.format, size)
        record.created_disks.append(made)
        try:
            save()
        except OSError as err:
            # Not on record, so nothing would ever remove it: remove it now.
            discard_disks(record)
            raise StorageError(
                f"disk {disk.path}: cannot record it in the domain's record: {err.strerror or err}"
            ) from err


def discard_disks(record: DomainRecord) -> None:
    """An arriving domain that will never run here: the disks made for it go."""
    if not record.created_disks:
        return
    for disk in record.created_disks:
        why = remove_made_disk(disk)
        if why is not None:
            log.error("domain %s: %s", record.config.name, why)
    log.info("domain %s: removed the copies begun here: %s", record.config.name,
             ", ".join(d.path for d in record.created_disks))  # fmt: skip
    record.created_disks = []
