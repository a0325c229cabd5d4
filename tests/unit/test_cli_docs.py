"""`ferry help`, the bash completion and the man page: all made from the one parser."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.cli.completion import bash_script
from ferry.cli.main import build_parser
from ferry.cli.manpage import man_page
from ferry.cli.parser_walk import walk
from ferry.daemon.api import ControlServer
from ferry.daemon.main import build_parser as ferryd_parser
from ferry.host.layout import HostLayout

from .migration_harness import Cluster, running

ROOT = walk(build_parser())
LEAVES = [c for c in ROOT.every()[1:] if not c.subcommands]
BIN = Path(sys.executable).parent


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ferry.cli.main", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def complete(line: str, path: str = str(BIN), script: str | None = None) -> list[str]:
    """What bash offers for the last word of ``line`` (a trailing space: a new word)."""
    words = line.split() + ([""] if line.endswith(" ") else [])
    program = (script or bash_script(ROOT)) + (
        "\nCOMP_WORDS=(" + " ".join(f"'{w}'" for w in words) + ")\n"
        f"COMP_CWORD={len(words) - 1}\n_ferry\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n"
    )
    result = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True,
                            timeout=60, env={"PATH": f"{path}:/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [w for w in result.stdout.splitlines() if w]


def test_help_names_every_command_and_refuses_an_unknown_one() -> None:
    listing = ferry("help")
    assert listing.returncode == 0
    for command in ROOT.subcommands:
        assert command.path[-1] in listing.stdout
    assert "_names" not in listing.stdout  # completion's helper stays hidden
    lab = ferry("help", "lab", "up")
    assert lab.returncode == 0 and lab.stdout.startswith("usage: ferry lab up")
    wrong = ferry("help", "lab", "sideways")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == "ferry help: no command 'ferry lab sideways': see ferry help"


@pytest.mark.parametrize("command", LEAVES, ids=lambda c: " ".join(c.path))
def test_every_command_is_in_the_man_page_and_the_completion(command: object) -> None:
    assert hasattr(command, "path")
    page = man_page(ROOT, walk(ferryd_parser()))
    name = " ".join(("ferry", *command.path)).replace("-", r"\-")
    assert f'.SS "{name}' in page
    script = bash_script(ROOT)
    parent = " ".join(command.path[:-1])
    assert command.path[-1] in complete(f"ferry {parent} ".replace("  ", " "), script=script)


@pytest.mark.skipif(shutil.which("groff") is None, reason="no groff here")
def test_the_man_page_renders_without_a_warning() -> None:
    page = ferry("man")
    assert page.returncode == 0
    rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=page.stdout,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
    assert ".SH FERRYD" in page.stdout and r"\-\-log\-file" in page.stdout


def test_completion_of_commands_options_and_choices() -> None:
    assert complete("ferry mi") == ["migrate"]
    assert complete("ferry migrate --comp") == ["--compression"]
    assert complete("ferry migrate --compression z") == ["zstd", "zlib"]
    assert complete("ferry lab ") == ["up", "down", "status", "exec"]
    assert complete("ferry lab up --storage ") == ["nfs", "nbd", "dir", "local"]
    assert complete("ferry --connect /x.sock lab st") == ["status"]


def test_names_are_asked_with_the_lines_own_connection(tmp_path: Path) -> None:
    stub = tmp_path / "ferry"
    stub.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\necho web1; echo web2; echo db\n')
    stub.chmod(0o755)
    assert complete("ferry --connect /s.sock migrate w", str(tmp_path)) == ["web1", "web2"]
    assert (tmp_path / "args").read_text().split() == ["--connect", "/s.sock", "_names", "domain"]
    assert complete("ferry migrate web1 ", str(tmp_path)) == ["web1", "web2", "db"]
    assert (tmp_path / "args").read_text().split() == ["_names", "host"]
    assert complete("ferry migrate web1 xen_host_2 ", str(tmp_path)) == []  # no third word


async def test_names_come_from_a_real_ferryd(tmp_path: Path) -> None:
    async with running(Cluster(tmp_path, secure=False)) as c:
        h1 = c.hosts[0]
        for name in ("web1", "web2"):
            await h1.s.lifecycle.create(c.domain(name))
        layout = HostLayout(h1.config.state_dir, h1.config.run_dir)
        server = ControlServer(h1.s, layout.control_socket)
        await server.start()
        try:
            line = f"ferry --connect {layout.control_socket} pause w"
            assert await asyncio.to_thread(complete, line) == ["web1", "web2"]
            line = f"ferry --connect {layout.control_socket} host evacuate "
            assert await asyncio.to_thread(complete, line) == ["h1"]
        finally:
            await server.close()
    # No ferryd answering: nothing offered, no error on the terminal.
    assert complete(f"ferry --connect {tmp_path}/none.sock pause ") == []
    assert os.path.exists(sys.executable)
