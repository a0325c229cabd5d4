"""``ferryd``: the per-host daemon."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path

from ferry.config.host import HostConfig, load_host_config
from ferry.daemon.api import ControlServer
from ferry.daemon.boot_files import guest_boot_files
from ferry.daemon.cluster_member import ClusterMember
from ferry.daemon.metrics import MetricsServer, register_state
from ferry.daemon.relocation import RelocationServer
from ferry.daemon.services import Services
from ferry.daemon.systemd import Notifier, setup_logging
from ferry.errors import FerryError, PkiError
from ferry.guest.image import default_cache_dir, load_image
from ferry.host.layout import HostLayout
from ferry.hypervisor.process import become_subreaper
from ferry.hypervisor.reaper import ChildReaper
from ferry.migration.params import MigrationParams
from ferry.pki.credentials import Credentials, insecure_warning
from ferry.pki.identity import Role

log = logging.getLogger("ferryd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferryd",
        description="ferry's per-host daemon: runs this host's domains, serves the control "
        "API and the relocation port, and migrates domains; run it from its systemd unit",
    )
    parser.add_argument("--config", type=Path, help="host config: ferryd.toml or xend-config.sxp")
    parser.add_argument("--name", help="this host's name (default: from config, else hostname)")
    parser.add_argument("--state-dir", type=Path, help="default /var/lib/ferry")
    parser.add_argument("--run-dir", type=Path, help="default /run/ferry")
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"])
    parser.add_argument("--image-cache", type=Path, help="guest image cache directory")
    parser.add_argument("--pki-dir", type=Path, help="this host's credentials (/etc/ferry/pki)")
    parser.add_argument(
        "--log-file", type=Path, help="also log here (reopened after logrotate moves it)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def host_config(args: argparse.Namespace) -> HostConfig:
    default = Path("/etc/ferry/ferryd.toml")
    path = args.config or (default if default.exists() else None)
    cfg = load_host_config(path)
    MigrationParams.from_wire(cfg.migration, f"{path}: [migration]")
    overrides = {
        "name": args.name,
        "state_dir": args.state_dir,
        "run_dir": args.run_dir,
        "accel": args.accel,
        "pki_dir": args.pki_dir,
    }
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def host_credentials(cfg: HostConfig) -> Credentials | None:
    """This host's credentials, checked; None when the config says insecure = true."""
    if cfg.insecure:
        log.warning(insecure_warning(f"ferryd for host {cfg.name}"))
        log.warning("INSECURE: the TCP control API is off (it never runs without TLS)")
        return None
    credentials = Credentials(cfg.pki_dir)
    try:
        identity = credentials.identity
    except PkiError as err:
        raise PkiError(
            f"{err} (or set insecure = true in the host config to run without TLS, "
            "as xend did: not recommended)"
        ) from None
    if identity.role is not Role.HOST or identity.name != cfg.name:
        raise PkiError(
            f"the certificate in {cfg.pki_dir} is that of {identity}, not of host {cfg.name}"
        )
    if not cfg.relocation.hosts_allow:
        log.info(
            "hosts-allow is empty: every host with a certificate of cluster %r may "
            "migrate domains here",
            identity.cluster,
        )
    return credentials


async def serve(cfg: HostConfig, image_cache: Path) -> None:
    credentials = host_credentials(cfg)
    layout = HostLayout(cfg.state_dir, cfg.run_dir)
    layout.create()
    lock = layout.lock_file.open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FerryError(f"another ferryd already runs with run directory {cfg.run_dir}") from None
    become_subreaper()
    reaper = ChildReaper()
    reaper.start()
    member = ClusterMember(cfg, layout, credentials) if cfg.cluster.enabled else None
    if member is None:
        log.warning(
            "no [cluster] etcd configured: standalone host, ownership is local only "
            "(another host on the same storage is not kept from running these domains)"
        )
    else:
        await member.ensure_fencer()
    services = Services.build(
        cfg,
        layout,
        guest_boot_files(lambda: load_image(image_cache), layout.nvram_dir),
        credentials,
        accel_cache=image_cache.parent / "accel-probe.json",
        boot_dirs=(image_cache,),
        cluster=member,
    )
    await services.reattach.all()
    await services.start_cluster()
    server = ControlServer(services, layout.control_socket, cfg.control)
    await server.start()
    relocation = None
    if cfg.relocation.enabled:
        relocation = RelocationServer(
            cfg.relocation, services.incoming, cfg.name, credentials, services.metrics
        )
        await relocation.start()
    register_state(services.metrics, cfg.name, services.table, member.lease if member else None)
    metrics = MetricsServer(cfg.metrics, services.metrics) if cfg.metrics.enabled else None
    if metrics is not None:
        await metrics.start()
    for note in cfg.ignored:
        log.info("config: %s", note)
    log.info("ferryd for host %s listening on %s", cfg.name, layout.control_socket)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    systemd = Notifier()
    systemd.ready(f"host {cfg.name}: {len(services.table.everyone())} domain(s) re-attached")
    await stop.wait()
    log.info("ferryd stopping; domains keep running")
    systemd.stopping("stopping; domains keep running")
    await systemd.close()
    await server.close()
    if relocation is not None:
        await relocation.close()
    if metrics is not None:
        await metrics.close()
    await services.close()
    await reaper.close()
    lock.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose, args.log_file)
    try:
        cfg = host_config(args)
        asyncio.run(serve(cfg, args.image_cache or default_cache_dir()))
    except FerryError as err:
        print(f"ferryd: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
