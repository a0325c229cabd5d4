"""Load the guest's own Python (ferry/guest/files) by path, under the names the guest uses.

These files are not ferry modules: in the guest, ferry_init is a package at the top
of /sbin/ferry-init's zip and the ledger is a script, so tests import them the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ferry.guest import image

FILES = Path(image.__file__).parent / "files"
INIT_PACKAGE = "ferry_init"


def _load(name: str, path: Path, package: bool = False) -> ModuleType:
    locations = [str(path.parent)] if package else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_init(module: str) -> ModuleType:
    """ferry_init.<module>, imported with its relative imports resolved inside the package."""
    package = sys.modules.get(INIT_PACKAGE)
    if package is None or Path(package.__file__ or "") != FILES / INIT_PACKAGE / "__init__.py":
        _load(INIT_PACKAGE, FILES / INIT_PACKAGE / "__init__.py", package=True)
    return importlib.import_module(f"{INIT_PACKAGE}.{module}")


def load_ledger() -> ModuleType:
    return _load("ferry_ledger", FILES / "ferry_ledger.py")


def load_dirty() -> ModuleType:
    return _load("ferry_dirty", FILES / "ferry_dirty.py")
