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
from ferry.daemon.relocation import RelocationServer
from ferry.daemon.services import Services
from ferry.errors import FerryError
from ferry.guest.image import default_cache_dir, load_image
from ferry.host.layout import HostLayout
from ferry.hypervisor.process import become_subreaper
from ferry.hypervisor.reaper import ChildReaper
from ferry.migration.params import MigrationParams

log = logging.getLogger("ferryd")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ferryd", description="ferry's per-host daemon")
    parser.add_argument("--config", type=Path, help="host config: ferryd.toml or xend-config.sxp")
    parser.add_argument("--name", help="this host's name (default: from config, else hostname)")
    parser.add_argument("--state-dir", type=Path, help="default /var/lib/ferry")
    parser.add_argument("--run-dir", type=Path, help="default /run/ferry")
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"])
    parser.add_argument("--image-cache", type=Path, help="guest image cache directory")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


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
    }
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


async def serve(cfg: HostConfig, image_cache: Path) -> None:
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
    services = Services.build(
        cfg,
        layout,
        guest_boot_files(lambda: load_image(image_cache)),
        accel_cache=image_cache.parent / "accel-probe.json",
        boot_dirs=(image_cache,),
    )
    await services.reattach.all()
    server = ControlServer(services, layout.control_socket)
    await server.start()
    relocation = None
    if cfg.relocation.enabled:
        relocation = RelocationServer(cfg.relocation, services.incoming, cfg.name)
        await relocation.start()
    for note in cfg.ignored:
        log.info("config: %s", note)
    log.info("ferryd for host %s listening on %s", cfg.name, layout.control_socket)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("ferryd stopping; domains keep running")
    await server.close()
    if relocation is not None:
        await relocation.close()
    await services.close()
    await reaper.close()
    lock.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s ferryd[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = host_config(args)
        asyncio.run(serve(cfg, args.image_cache or default_cache_dir()))
    except FerryError as err:
        print(f"ferryd: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
