"""ferryd's parts, built once and wired together: the daemon's composition root.

Each part receives only what it needs: the table (state), the launcher
(QEMU and its resources), the watcher, and each other's public methods. No
part holds the whole daemon.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.cluster.ownership import Ownership
from ferry.config.host import HostConfig
from ferry.daemon.cluster_member import ClusterMember
from ferry.daemon.ha import HaRestarts
from ferry.daemon.lifecycle import Lifecycle
from ferry.daemon.reattach import Reattach
from ferry.daemon.save_restore import SaveRestore
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
from ferry.util.metrics import Metrics
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
    metrics: Metrics
    save_restore: SaveRestore
    # This host's membership of a cluster (etcd); None: a standalone host.
    cluster: ClusterMember | None = None
    ha: HaRestarts | None = None

    @classmethod
    def build(
        cls,
        host: HostConfig,
        layout: HostLayout,
        boot_files: BootFilesProvider,
        credentials: Credentials | None,
        accel_cache: Path | None = None,
        boot_dirs: Sequence[Path] = (),
        ownership: Ownership | None = None,
        cluster: ClusterMember | None = None,
    ) -> Services:
        defaults = MigrationParams.from_wire(host.migration, f"host {host.name}: [migration]")
        table = DomainTable(host.name, layout)
        if cluster is not None:
            ownership = cluster.ownership
        launcher = Launcher(host, layout, boot_files, accel_cache, boot_dirs, ownership)
        watcher = DomainWatcher(table, launcher)
        background = Background()
        metrics = Metrics()
        end = SourceEnd(table, launcher, functools.partial(ask_outcome, credentials=credentials))
        tls = QemuTls(credentials, layout.run_dir / "tls") if credentials else None
        outgoing = OutgoingMigrations(table, launcher, end, background, tls, metrics)
        lifecycle = Lifecycle(table, launcher, watcher)
        incoming = IncomingMigrations(table, launcher, watcher, tls)
        return cls(
            host=host,
            credentials=credentials,
            migration_defaults=defaults,
            table=table,
            launcher=launcher,
            watcher=watcher,
            lifecycle=lifecycle,
            outgoing=outgoing,
            incoming=incoming,
            source_end=end,
            reattach=Reattach(table, launcher, watcher, outgoing, end, incoming),
            background=background,
            metrics=metrics,
            save_restore=SaveRestore(table, launcher, lifecycle),
            cluster=cluster,
        )

    async def start_cluster(self) -> None:
        """Join the cluster with what runs here (after re-attach)."""
        if self.cluster is not None:
            await self.cluster.start(self.table, self.launcher)
            self.ha = HaRestarts(self.cluster, self.lifecycle)
            self.ha.start()

    async def cluster_domains(self) -> list[dict[str, Any]]:
        """Every domain of the cluster (this host's alone when standalone)."""
        if self.cluster is not None:
            return await self.cluster.domains()
        return [{"host": self.host.name} | row for row in self.lifecycle.list_rows()]

    async def cluster_hosts(self) -> list[dict[str, Any]]:
        if self.cluster is not None:
            return await self.cluster.hosts()
        return [
            {
                "host": self.host.name,
                "health": "up",
                "mode": "standalone (local ownership only: no etcd configured)"
                + (", INSECURE (no TLS)" if self.credentials is None else ""),
                "maintenance": False,
                "cpus": os.cpu_count(),
                "domains": len(self.table.everyone()),
            }
        ]

    async def close(self) -> None:
        """Stop watching (ferryd is exiting); the QEMUs keep running.

        Except arriving ones: nobody will be left here to commit them.
        """
        await self.incoming.close()
        await self.background.close()
        if self.ha is not None:
            await self.ha.close()
        if self.cluster is not None:
            await self.cluster.close()
        for dom in [*self.table.everyone(), *self.table.leaving()]:
            await self.watcher.stop(dom)
