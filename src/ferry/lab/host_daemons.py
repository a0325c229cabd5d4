"""The ferryd of each lab host: started in the host's namespace, restarted, stopped.

Each ferryd's files are under ``<workdir>/hosts/<host>/`` (ferryd.toml,
state/, ferryd.log); its run directory (control socket) is
``/run/ferrylab/<host>``, short enough for a unix socket path.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from ferry.errors import FerryError
from ferry.hypervisor import process
from ferry.lab import etcd_cluster, topology
from ferry.lab.configs import host_config_text
from ferry.lab.ferryd_process import FerrydProcess
from ferry.lab.pki import bundle_dir, ensure_lab_pki
from ferry.lab.state import HostDaemon, Lab
from ferry.lab.storage import LabProcess, wait_gone

RUN_ROOT = Path("/run/ferrylab")


def start_ferryd(lab: Lab, host: str, config_text: str | None = None) -> None:
    """Start ``host``'s ferryd and record it in the lab's state, answering or not."""
    base = lab.workdir / "hosts" / host
    base.mkdir(parents=True, exist_ok=True)
    state_dir, run_dir = base / "state", RUN_ROOT / host
    config = base / "ferryd.toml"
    ensure_lab_pki(lab.workdir)
    pki_dir = bundle_dir(lab.workdir, host)
    config.write_text(
        config_text
        or host_config_text(
            host,
            state_dir,
            run_dir,
            lab.export_dir,
            pki_dir,
            etcd_cluster.client_urls(),
            etcd_cluster.LEASE_TTL,
        )
    )
    daemon = HostDaemon(host, str(config), str(state_dir), str(run_dir), str(base / "ferryd.log"))
    ferryd = FerrydProcess(
        name=host, state_dir=state_dir, run_dir=run_dir, log=Path(daemon.log),
        ns=topology.node(host).ns, config=config,
        private_dir=(lab.local_dir(host), lab.export_dir) if lab.storage == "local" else None,
    )  # fmt: skip
    lab.daemons[host] = daemon
    try:
        ferryd.start()
    finally:
        if ferryd.proc is not None:
            # Recorded even if it never answered, so that `down` ends it.
            daemon.process = LabProcess.started(
                f"ferryd-{host}", ferryd.proc, str(config), Path(daemon.log)
            )
        lab.save()


def restart_ferryd(lab: Lab, host: str, config_text: str | None = None) -> None:
    """Stop a host's ferryd (its domains keep running) and start it again,
    with a new host config if one is given."""
    daemon = lab.daemons[host]
    if daemon.process is not None:
        daemon.process.stop(timeout=20)
    start_ferryd(lab, host, config_text)


def stop_host(daemon: HostDaemon) -> list[str]:
    """Destroy the host's domains through its ferryd, then end the ferryd."""
    done: list[str] = []
    if daemon.process is None or not daemon.process.is_running():
        return done
    ferryd = FerrydProcess(
        name=daemon.host, state_dir=Path(daemon.state_dir), run_dir=Path(daemon.run_dir),
        log=Path(daemon.log),
    )  # fmt: skip
    # OSError: a ferryd dying right now resets the connection (DaemonClient lets it through).
    with contextlib.suppress(FerryError, OSError):
        client = ferryd.client(timeout=30)
        for row in client.call("list"):
            with contextlib.suppress(FerryError, OSError):
                client.call("destroy", name=row["name"])
                done.append(f"destroyed {row['name']} on {daemon.host}")
    if daemon.process.stop(timeout=20):
        done.append(f"stopped ferryd of {daemon.host}")
    if stop_fencer(Path(daemon.run_dir)):
        done.append(f"stopped the fencer of {daemon.host}")
    return done


def stop_fencer(run_dir: Path) -> bool:
    """End the host's fencer (its pid file, checked against its command line)."""
    try:
        pid = int((run_dir / "fencer.pid").read_text())
    except (OSError, ValueError):
        return False
    found = process.processes(b"ferry.daemon.fencer", str(run_dir).encode())
    if pid not in found:
        return False
    os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, 10):
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 5)
    return True
