"""Planted bugs in the migration, commit, lease, restart and trust paths: each must turn a test red.

A mutant is one textual change to one source file. ``run_mutants.py`` applies
each in a copy of the tree and runs the protocol's unit tests; a mutant that
leaves them green is a guarantee nothing proves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # under src/ferry/
    old: str
    new: str


MUTANTS = [
    Mutant(
        "source resumes when the commit answer is lost",
        "migration/source.py",
        "            raise MigrationInDoubt(",
        "            raise MigrationError(",
    ),
    Mutant(
        "target takes a heartbeat for the commit",
        "migration/target.py",
        'if message["type"] == "ping":\n                continue',
        'if message["type"] == "ping":\n                break',
    ),
    Mutant(
        "abort leaves the target's QEMU running",
        "migration/incoming.py",
        "        await self.launcher.end_qemu(dom)\n        # Only once",
        "        # Only once",
    ),
    Mutant(
        "the lease check at prepare is skipped",
        "migration/incoming.py",
        "if not isinstance(token, str) or held is None or held.token != token:",
        "if False:",
    ),
    Mutant(
        "the in-doubt resolver takes pending for aborted",
        "migration/indoubt.py",
        "if outcome == Outcome.ABORTED:",
        "if outcome in (Outcome.ABORTED, Outcome.PENDING):",
    ),
    Mutant(
        "outcomes are kept in memory only",
        "host/outcomes.py",
        "        self._entries[migration_id] = (outcome, time.time())\n        self._save()",
        "        self._entries[migration_id] = (outcome, time.time())",
    ),
    Mutant(
        "an unknown migration is answered as aborted",
        "migration/incoming.py",
        "else UNKNOWN",
        'else "aborted"',
    ),
    Mutant(
        "a rollback resumes a domain that was paused",
        "migration/indoubt.py",
        "if was_running and not running:",
        "if not running:",
    ),
    Mutant(
        "the target resumes without writing the commit",
        "migration/incoming.py",
        "        self.table.decide(migration_id, Outcome.COMMITTED)\n",
        "",
    ),
    Mutant(
        "the source keeps its QEMU after handing over",
        "migration/indoubt.py",
        "        self.table.transition(dom, Event.MIGRATE_OUT_DONE)\n"
        "        await self.launcher.end_qemu(dom)",
        "        self.table.transition(dom, Event.MIGRATE_OUT_DONE)",
    ),
    Mutant(
        "a restarted target keeps an uncommitted arrival",
        "daemon/reattach.py",
        "if outcome is Outcome.COMMITTED:",
        "if outcome is not Outcome.ABORTED:",
    ),
    Mutant(
        "a failure after the commit point is answered as an error",
        "migration/target.py",
        "if host.migration_outcome(migration_id) == Outcome.COMMITTED:",
        "if False:",
    ),
    Mutant(
        "a restarted source resumes a domain whose stream had completed",
        "daemon/reattach.py",
        'if qemu_state == "completed" and dom.record.migration_id:',
        "if False:",
    ),
    Mutant(
        "a rollback does not cancel QEMU's stream",
        "migration/source.py",
        '                await self.monitor.execute("migrate_cancel")\n',
        "",
    ),
    Mutant(
        "the data connection takes any token",
        "migration/incoming.py",
        "if arriving is None or not secrets.compare_digest(arriving.token, token):",
        "if arriving is None:",
    ),
    Mutant(
        "a migration id of any shape is taken",
        "migration/target.py",
        "if not MIGRATION_ID_RE.fullmatch(migration_id):",
        "if not migration_id:",
    ),
    Mutant(
        "a revoked peer's certificate is taken",
        "pki/credentials.py",
        "        if identity.serial in self._revoked:",
        "        if False:",
    ),
    Mutant(
        "the target admits a relocation from an operator's certificate",
        "daemon/relocation.py",
        "if peer is not None and peer.role is not Role.HOST:",
        "if False:",
    ),
    Mutant(
        "the source migrates to whoever answers, named as asked or not",
        "migration/channel.py",
        "    if not identity.answers_to(host):",
        "    if False:",
    ),
    Mutant(
        "the target's QEMU admits any certificate of the cluster",
        "pki/qemu_tls.py",
        '"tls-creds": CREDS_ID, "tls-authz": AUTHZ_ID}',
        '"tls-creds": CREDS_ID}',
    ),
    Mutant(
        "a plain connection may open a migration on a secure host",
        "daemon/relocation.py",
        'kinds = frozenset({"data"})',
        'kinds = frozenset({"data", "hello", "status"})',
    ),
    Mutant(
        "create takes no ownership in etcd",
        "host/launcher.py",
        "            await self.ownership.take(cfg.name, disks, also=ha)",
        "            pass",
    ),
    Mutant(
        "the commit applies whatever the source's key became",
        "cluster/ownership.py",
        '[Compare(dkey, "mod", "==", ticket.revision)], ops, [Get(dkey)]',
        "[], ops, [Get(dkey)]",
    ),
    Mutant(
        "the target resumes without winning the commit in etcd",
        "migration/incoming.py",
        "        if not committed:\n",
        "        if False:\n",
    ),
    Mutant(
        "the fencer lets QEMUs run while the lease expires",
        "daemon/fencer.py",
        "        if new is LeaseState.EXPIRING:",
        "        if False:",
    ),
    Mutant(
        "the fencer leaves QEMUs alive once the lease is lost",
        "daemon/fencer.py",
        "        elif new is LeaseState.LOST:",
        "        elif False:",
    ),
    Mutant(
        "a source in doubt waits for the target even in a cluster",
        "migration/indoubt.py",
        "        if self.launcher.ownership.clustered:",
        "        if False:",
    ),
    Mutant(
        "a domain ended on purpose keeps its HA record",
        "cluster/ownership.py",
        "*(Delete(self.keys.disk(d)) for d in disks), Delete(self.keys.ha(name))]",
        "*(Delete(self.keys.disk(d)) for d in disks)]",
    ),
    Mutant(
        "a host in maintenance still takes new domains",
        "cluster/ownership.py",
        "[Compare.absent(maintenance), Compare.absent(dkey),",
        "[Compare.absent(dkey),",
    ),
    Mutant(
        "a backing file outside the storage roots is let through",
        "storage/images.py",
        "        return resolve_disk(DiskSpec(path=path, writable=False), roots)",
        "        return path",
    ),
    Mutant(
        "a corrupt qcow2 image is started",
        "storage/images.py",
        "    if rc in (0, CHECK_LEAKS):",
        "    if True:",
    ),
    Mutant(
        "the target does not compare the image's format with the source's",
        "migration/incoming.py",
        "            if theirs is not None and theirs != here.format:",
        "            if False:",
    ),
    Mutant(
        "a page-cached disk on a shared file system migrates without --unsafe",
        "storage/cache_safety.py",
        "    if kind in CLUSTER_FS or not is_network_fs(kind):",
        "    if True:",
    ),
    Mutant(
        "the target does not compare the cloud-init seed with the source's",
        "migration/incoming.py",
        '        if seed is not None and boot.get("seed_sha256") != await asyncio.to_thread(',
        "        if seed is not None and None is await asyncio.to_thread(",
    ),
]
