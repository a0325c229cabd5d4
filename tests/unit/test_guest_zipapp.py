"""Deterministic zipapps: the same sources give the same bytes, and Python runs them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ferry.util import zipapp

ENTRIES = {
    "__main__.py": b"from pkg import greet\n\ngreet()\n",
    "pkg/__init__.py": b"from .words import WORD\n\n\ndef greet():\n    print(WORD)\n",
    "pkg/words.py": b"WORD = 'ahoy'\n",
}


def test_same_entries_same_bytes_whatever_their_order() -> None:
    data = zipapp.build(ENTRIES, "/usr/bin/python3 -I")
    assert zipapp.build(dict(reversed(list(ENTRIES.items()))), "/usr/bin/python3 -I") == data
    assert zipapp.build(ENTRIES, "/usr/bin/python3") != data
    changed = dict(ENTRIES, **{"pkg/words.py": b"WORD = 'ahoy!'\n"})
    assert zipapp.build(changed, "/usr/bin/python3 -I") != data


def test_entries_are_sorted_stored_and_undated(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.write_bytes(zipapp.build(ENTRIES, "/usr/bin/python3 -I"))
    assert app.read_bytes().startswith(b"#!/usr/bin/python3 -I\n")
    with zipfile.ZipFile(app) as archive:
        infos = archive.infolist()
        assert [archive.read(i) for i in infos] == [ENTRIES[name] for name in sorted(ENTRIES)]
    assert [i.filename for i in infos] == sorted(ENTRIES)
    assert {(i.date_time, i.compress_type, i.external_attr >> 16) for i in infos} == {
        ((1980, 1, 1, 0, 0, 0), zipfile.ZIP_STORED, 0o100644)
    }


def test_python_runs_it_isolated(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.write_bytes(zipapp.build(ENTRIES, "/usr/bin/python3 -I"))
    proc = subprocess.run(
        [sys.executable, "-I", str(app)], capture_output=True, text=True, timeout=30, check=False
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ahoy\n", "")


def test_a_zipapp_needs_a_main() -> None:
    with pytest.raises(ValueError, match=r"no __main__\.py"):
        zipapp.build({"pkg/__init__.py": b""}, "/usr/bin/python3")
