"""ferryd's parts, built once and wired together: the daemon's composition root.

Each part receives only what it needs: the table (state), the launcher
(QEMU and its resources), the watcher, and each other's public methods. No
part holds the whole daemon.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry.config.host import HostConfig
from ferry.daemon.lifecycle import Lifecycle
from ferry.daemon.reattach import Reattach
from ferry.host.launcher import Launcher
from ferry.host.layout import HostLayout
from ferry.host.running import BootFilesProvider
from ferry.host.table import DomainTable
from ferry.host.watcher import DomainWatcher
from ferry.migration.incoming import IncomingMigrations
from ferry.migration.indoubt import SourceEnd, ask_outcome
from ferry.migration.outgoing import OutgoingMigrations
from ferry.migration.params import MigrationParams
from ferry.pki.credentials import Credentials
from ferry.pki.qemu_tls import QemuTls
from ferry.util.tasks import Background


@dataclass
class Services:
    host: HostConfig
    # This host's credentials; None when the host config says insecure = true.
    credentials: Credentials | None
    migration_defaults: MigrationParams
    table: DomainTable
    launcher: Launcher
    watcher: DomainWatcher
    lifecycle: Lifecycle
    outgoing: OutgoingMigrations
    incoming: IncomingMigrations
    source_end: SourceEnd
    reattach: Reattach
    background: Background

    @classmethod
    def build(
        cls,
        host: HostConfig,
        layout: HostLayout,
        boot_files: BootFilesProvider,
        credentials: Credentials | None,
        accel_cache: Path | None = None,
        boot_dirs: Sequence[Path] = (),
    ) -> Services:
        defaults = MigrationParams.from_wire(host.migration, f"host {host.name}: [migration]")
        table = DomainTable(host.name, layout)
        launcher = Launcher(host, layout, boot_files, accel_cache, boot_dirs)
        watcher = DomainWatcher(table, launcher)
        background = Background()
        end = SourceEnd(table, launcher, functools.partial(ask_outcome, credentials=credentials))
        tls = QemuTls(credentials, layout.run_dir / "tls") if credentials else None
        outgoing = OutgoingMigrations(table, launcher, end, background, tls)
        return cls(
            host=host,
            credentials=credentials,
            migration_defaults=defaults,
            table=table,
            launcher=launcher,
            watcher=watcher,
            lifecycle=Lifecycle(table, launcher, watcher),
            outgoing=outgoing,
            incoming=IncomingMigrations(table, launcher, watcher, tls),
            source_end=end,
            reattach=Reattach(table, launcher, watcher, outgoing, end),
            background=background,
        )

    async def close(self) -> None:
        """Stop watching (ferryd is exiting); the QEMUs keep running.

        Except arriving ones: nobody will be left here to commit them.
        """
        await self.incoming.close()
        await self.background.close()
        for dom in self.table.everyone():
            await self.watcher.stop(dom)
