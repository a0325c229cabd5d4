"""``ferry demo``: the classic live-migration demonstration, narrated and measured.

The steps of the 2007 walkthrough, in the lab: ``virt_server`` is created on
``xen_host_1`` from an xm config like the classic one; the viewer in
``client_2`` plays the movie; the VM is paused until the player runs dry
(which measures the player's buffer) and unpaused; playback starts again and
the VM is live-migrated to ``xen_host_2`` and back, while ``list --all``
(the whole cluster, from etcd) shows it moving. The verdict says whether the stream stayed unbroken;
a report directory keeps every figure, a timeline plot and an HTML page.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ferry.client.daemon_client import DaemonClient
from ferry.client.migrate_view import summary
from ferry.errors import FerryError, WaitTimeout
from ferry.guest.image import build_image
from ferry.lab import lab as lab_mod
from ferry.lab import topology
from ferry.lab.dashboard_process import LabDashboard
from ferry.lab.pki import STATION
from ferry.lab.player import LabPlayer
from ferry.lab.report import write_report
from ferry.lab.state import Lab
from ferry.util.wait import wait_until_sync

VM = "virt_server"
MOVIE = "http://virt_server:8888/movie.ogg"
PLAYER_BUFFER_S = 10.0


@dataclass(frozen=True)
class DemoOptions:
    rate: str = "100mbit"
    memory: int = 256
    storage: str = "nfs"
    round_trips: int = 1
    report_dir: Path = Path("ferry-demo-report")
    workdir: Path = lab_mod.DEFAULT_WORKDIR
    keep: bool = False
    boot: str = "kernel"  # "disk": virt_server boots its own kernel from its disk
    dashboard: int | None = None  # serve the live page on this port of 127.0.0.1


class Demo:
    def __init__(self, opts: DemoOptions) -> None:
        self.opts = opts
        self.out = Console(highlight=False)
        self.lab: Lab | None = None
        self.players: list[LabPlayer] = []
        self.dashboard: LabDashboard | None = None
        self.interrupted = False
        self._moving_since: float | None = None  # when the source first listed migrating-out
        self.data: dict[str, Any] = {"origin": time.time(), "migrations": [], "summary": []}

    def say(self, text: str) -> None:
        elapsed = time.time() - self.data["origin"]
        self.out.print(f"[dim]{elapsed:6.1f}s[/] {text}")

    def step(self, title: str) -> None:
        self.out.rule(f"[bold]{title}")

    # -- set-up ------------------------------------------------------------------

    def set_up(self) -> Lab:
        self.step("Setting up: the guest image and the classic lab")
        image = build_image(log=lambda line: self.out.print(f"  [dim]{line}[/]"))
        self.say(f"guest image ready (kernel {image.kernel_version})")
        lab = self._reuse_lab()
        if lab is None:
            lab = lab_mod.up(
                self.opts.storage,
                rate=self.opts.rate,
                workdir=self.opts.workdir,
                memory=self.opts.memory,
                log=lambda line: self.out.print(f"  [dim]{line}[/]"),
                boot=self.opts.boot,
            )
        self.lab = lab
        if self.opts.dashboard is not None:
            self.dashboard = LabDashboard(
                lab, self.opts.dashboard, self.opts.report_dir / "player-status.json",
                self.opts.report_dir / "dashboard.log",
            )  # fmt: skip
            self.say(f"[bold]live dashboard: {self.dashboard.url}[/] (open it in a browser)")
        self.say(
            f"lab up: xen_host_1, xen_host_2, client_1, client_2 on a "
            f"{lab.rate or 'unshaped'} LAN, "
            f"{lab.storage} storage ({lab.disk}), "
            + (
                "virt_server boots its own kernel from its disk (pygrub's way)"
                if lab.boot == "disk"
                else "ferry boots virt_server's kernel directly"
            )
        )
        self.data["setup"] = {
            "rate": lab.rate,
            "storage": lab.storage,
            "disk": lab.disk,
            "boot": lab.boot,
            "memory_mib": self.opts.memory,
            "round_trips": self.opts.round_trips,
            "player_buffer_s": PLAYER_BUFFER_S,
            "movie": MOVIE,
        }
        return lab

    def _reuse_lab(self) -> Lab | None:
        try:
            lab = lab_mod.load(self.opts.workdir)
            healthy = lab.status().get("healthy", False)
        except FerryError:
            return None
        wanted_rate = topology.parse_rate(self.opts.rate) if self.opts.rate != "none" else None
        same = (lab.storage, lab.rate, lab.boot) == (self.opts.storage, wanted_rate, self.opts.boot)
        if healthy and same:
            for host in ("xen_host_1", "xen_host_2"):
                if VM in self._names(lab, host):
                    lab.run(host, ["ferry", "destroy", VM])
            self.say(f"reusing the healthy lab in {lab.workdir}")
            return lab
        return None

    @staticmethod
    def _names(lab: Lab, host: str) -> set[str]:
        rows = DaemonClient(lab.daemons[host].socket, timeout=30).call("list")
        return {str(row["name"]) for row in rows}

    # -- the classic steps --------------------------------------------------------

    def create(self, lab: Lab) -> None:
        self.step(
            "xm create -c virt_server  →  ferry --host xen_host_1 create virt_server "
            "(from the station, client_1)"
        )
        config = self.opts.report_dir / "virt_server"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(lab.domain_config_text(memory=self.opts.memory))
        self.out.print(config.read_text().rstrip(), style="cyan")
        result = lab.run(
            STATION, self._station_argv("xen_host_1", "create", str(config.resolve())), timeout=300
        )
        for line in (result.stdout + result.stderr).strip().splitlines():
            self.say(line)
        if result.returncode != 0:
            raise FerryError(f"ferry create failed: {result.stderr.strip()}")
        start = time.monotonic()
        try:
            wait_until_sync(
                lab.vm_serving,
                timeout=180,
                what="virt_server's services",
                interval=0.3,
            )
        except WaitTimeout as err:
            raise FerryError("virt_server's services did not come up within 180 s") from err
        self.say(
            f"virt_server is up and serving {MOVIE} ({time.monotonic() - start:.1f} s after create)"
        )
        self.show_lists(lab)

    def measure_buffer(self, lab: Lab) -> None:
        self.step("xm pause: the player plays on from its buffer until it runs dry")
        player = LabPlayer(
            lab, self.opts.report_dir, "pause-player", MOVIE, PLAYER_BUFFER_S, max_time=60
        )
        self.players.append(player)
        player.wait_for(
            "playback", lambda s: s.get("state") == "playing" and s.get("t_s", 0) > 6, 60
        )
        self.say("client_2 is playing the movie; $ ferry --host xen_host_1 pause virt_server")
        paused_at = time.time()
        self._ferry(lab, "xen_host_1", "pause", VM)
        status = player.wait_for("an empty buffer", lambda s: s.get("state") == "stalled", 60)
        dry_at = time.time()
        self.say(
            f"the player ran dry {dry_at - paused_at:.1f} s after the pause "
            f"(it had played on from its buffer); $ ferry --host xen_host_1 unpause virt_server"
        )
        time.sleep(1.0)  # let the stall show on the timeline
        self._ferry(lab, "xen_host_1", "unpause", VM)
        self.data["pause"] = {"start": paused_at, "end": time.time(), "dry_at": dry_at}
        player.wait_for("playback again", lambda s: s.get("state") == "playing", 30)
        player.stop()
        report = player.finish(15)
        drained = [
            o["drained_after_s"] for o in report.get("outages", []) if o.get("drained_after_s")
        ]
        buffer_s = drained[0] if drained else round(dry_at - paused_at, 2)
        self.data["buffer_s"] = buffer_s
        self.data["pause_player"] = report
        self.say(
            f"[bold]measured buffer: {buffer_s:.2f} s[/] of playback after the source stopped "
            f"(status at the stall: {status.get('stalls')} stall)"
        )

    def migrate_round_trips(self, lab: Lab) -> LabPlayer:
        self.step("Playback again; xm migrate -l virt_server xen_host_2  →  ferry migrate -l")
        # 20 ms samples: the report zooms in on each switchover.
        player = LabPlayer(
            lab, self.opts.report_dir, "player", MOVIE, PLAYER_BUFFER_S, sample_interval=0.02
        )
        self.players.append(player)
        player.wait_for(
            "a full buffer", lambda s: s.get("state") == "playing" and s.get("t_s", 0) > 6, 60
        )
        self.say("client_2 is playing the movie again")
        legs = [("xen_host_1", "xen_host_2"), ("xen_host_2", "xen_host_1")] * self.opts.round_trips
        for source, target in legs:
            self.migrate(lab, source, target)
            time.sleep(3)
        return player

    def migrate(self, lab: Lab, source: str, target: str) -> None:
        # No shared storage: the disk goes with the VM.
        copy = ["--copy-storage"] if lab.storage == "local" else []
        shown = " ".join(["migrate", "-l", *copy, VM, target])
        self.say(f"$ ferry --host {source} {shown}   (on the station, {STATION})")
        argv = self._station_argv(source, "migrate", "-l", *copy, "--json", VM, target)
        start = time.time()
        # The station's own ferry shows its progress bar on our terminal (stderr);
        # its result comes back as JSON on stdout.
        proc = lab.popen(STATION, argv, stdout=subprocess.PIPE)
        try:
            wait_until_sync(
                lambda: proc.poll() is not None or self._moving_for(lab, source, 1.0),
                timeout=120, what=f"{VM} to be migrating", interval=0.3,
            )  # fmt: skip
            if proc.poll() is None:
                self.show_lists(lab)
            out, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        end = time.time()
        if proc.returncode != 0:
            raise FerryError(f"ferry migrate from the station failed (status {proc.returncode})")
        result = json.loads(out)
        self.say(summary(VM, target, result))
        self.show_lists(lab)
        if copy:
            self._remove_stale_copy(lab, source)
        self.data["migrations"].append(
            {
                **result,
                "source": source,
                "start": start,
                "end": end,
                "stop_at": result.get("stopped_at"),
                "resume_at": result.get("resumed_at"),
            }
        )

    def _remove_stale_copy(self, lab: Lab, host: str) -> None:
        """What an operator does once the VM runs well on its new host: the disk left
        behind is stale (its lease names the new host), and a copy back needs it gone."""
        disk = lab.local_dir(host) / f"{VM}.img"
        self.say(f"$ rm {lab.export_dir / disk.name} {lab.export_dir / disk.name}.ferry-lease"
                 f"   (on {host}: its stale copy)")  # fmt: skip
        disk.unlink()
        disk.with_name(disk.name + ".ferry-lease").unlink(missing_ok=True)

    def _moving_for(self, lab: Lab, host: str, seconds: float) -> bool:
        """True once the source has listed the VM as migrating-out for ``seconds``."""
        state = {r["name"]: r["state"] for r in self._station_list(lab, host)}.get(VM)
        if state != "migrating-out":
            return False
        self._moving_since = self._moving_since or time.monotonic()
        if time.monotonic() - self._moving_since < seconds:
            return False
        self._moving_since = None
        return True

    def show_lists(self, lab: Lab) -> None:
        """``ferry list --all`` from the station: every host's domains in one view."""
        table = Table("Host", "Name", "ID", "Mem", "VCPUs", "State", box=None)
        rows = json.loads(self._ferry(lab, "xen_host_1", "list", "--all", "--json"))
        for row in rows if isinstance(rows, list) else []:
            table.add_row(
                *(str(row.get(k, "")) for k in ("host", "name", "id", "mem", "vcpus", "state"))
            )
        self.out.print(table)

    def _station_list(self, lab: Lab, host: str) -> list[dict[str, Any]]:
        rows = json.loads(self._ferry(lab, host, "list", "--json"))
        return rows if isinstance(rows, list) else []

    @staticmethod
    def _station_argv(host: str, *args: str) -> list[str]:
        """``ferry`` as the operator types it on the station: every verb remote, over
        mutual TLS with the station's admin certificate ($FERRY_PKI in the lab)."""
        return ["ferry", "--host", host, *args]

    def _ferry(self, lab: Lab, host: str, *args: str) -> str:
        result = lab.run(STATION, self._station_argv(host, *args))
        if result.returncode != 0:
            raise FerryError(
                f"ferry --host {host} {' '.join(args)} on {STATION} failed: {result.stderr.strip()}"
            )
        return result.stdout

    # -- verdict and report -------------------------------------------------------

    def conclude(self, player: LabPlayer) -> int:
        self.step("The verdict")
        self.say("waiting for the movie to play to its end")
        report = player.finish(timeout=150)
        self.data["player"] = report
        self.data["stalls_at"] = [
            [report["started_at"] + s["start_s"], s["duration_s"]] for s in report.get("stalls", [])
        ]
        unbroken = (
            not report["stalls"] and report["reconnects"] == 0 and report["checksum"] == "match"
        )
        self.data["unbroken"] = unbroken
        self.data["verdict"] = "the stream was unbroken" if unbroken else "the stream broke"
        lines = [f"buffer measured by the pause: {self.data.get('buffer_s', 0):.2f} s"]
        for m in self.data["migrations"]:
            lines.append(
                f"{m['source']} -> {m['target']}: total {m['total_s']:.1f} s, downtime "
                f"{m['switchover_ms']} ms (QEMU {m['qemu_downtime_ms']} ms, "
                f"commit {m['commit_ms']} ms), "
                f"{m['bytes_sent'] / 1e6:.1f} MB sent"
            )
        lines.append(
            f"player: largest gap {report['longest_gap_ms']:.0f} ms, "
            f"{len(report['stalls'])} stalls, "
            f"{report['reconnects']} reconnects, bytes {report['checksum']} "
            f"({report['bytes_received'] / 1e6:.1f} MB)"
        )
        self.data["summary"] = lines
        self.data["title"] = f"ferry demo: {self.data['verdict']}"
        paths = write_report(self.data, self.opts.report_dir)
        style = "bold green" if unbroken else "bold red"
        self.out.print(f"VERDICT: {self.data['verdict']}", style=style)
        for line in lines:
            self.out.print(f"  {line}")
        self.out.print(f"report: {paths['html']} (plot {paths['png']}, data {paths['json']})")
        return 0 if unbroken else 1

    def tear_down(self) -> None:
        for player in self.players:
            player.stop()
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.opts.keep and self.lab is not None and not self.interrupted:
            self.out.print(
                "lab left up (--keep): try `ferry lab exec client_1 ferry --host xen_host_2 list`; "
                "`ferry lab down` removes it"
            )
            return
        lab_mod.down(self.opts.workdir, log=lambda _line: None)
        self.out.print("lab removed")


def run_demo(opts: DemoOptions) -> int:
    demo = Demo(opts)
    try:
        lab = demo.set_up()
        demo.create(lab)
        demo.measure_buffer(lab)
        player = demo.migrate_round_trips(lab)
        return demo.conclude(player)
    except KeyboardInterrupt:
        demo.out.print("interrupted: removing everything the demo made")
        demo.interrupted = True
        return 130
    finally:
        demo.tear_down()
