"""Load the guest's own Python (ferry/guest/files) by path, under the names the guest uses.

These files are not ferry modules: in the guest the ledger is a script, so tests
import it the same way.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ferry.guest import image

FILES = Path(image.__file__).parent / "files"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_ledger() -> ModuleType:
    return _load("ferry_ledger", FILES / "ferry_ledger.py")
