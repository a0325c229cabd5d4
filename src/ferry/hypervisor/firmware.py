"""The UEFI firmware (OVMF) a domain with ``firmware = "uefi"`` boots with.

The code image is shared, read-only; every domain has its own variables file
(boot entries, settings), made from the template at its first start and kept
under the host's state directory. A live migration carries both flash images
in its stream: the target needs files of the very same sizes, and writes the
variables it received into its own file when the domain resumes there.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import ImageError

# Debian's ovmf package: the 4 MiB build (the 2 MiB one is legacy).
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS_TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@dataclass(frozen=True)
class UefiFiles:
    code: Path = OVMF_CODE
    vars_template: Path = OVMF_VARS_TEMPLATE

    def check(self) -> None:
        for path in (self.code, self.vars_template):
            if not path.is_file():
                raise ImageError(f"UEFI firmware {path} is missing (install Debian's ovmf)")

    def sizes(self) -> dict[str, int]:
        self.check()
        return {
            "uefi_code_size": self.code.stat().st_size,
            "uefi_vars_size": self.vars_template.stat().st_size,
        }


def ensure_vars(vars_file: Path, template: Path) -> None:
    """The domain's variables file: kept if it is there (and the right size),
    else a copy of the template. An arriving domain's gets its content from
    the migration stream whatever the file held."""
    size = template.stat().st_size
    if vars_file.is_file() and vars_file.stat().st_size == size:
        return
    vars_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = vars_file.with_name(vars_file.name + ".tmp")
    shutil.copyfile(template, tmp)
    os.chmod(tmp, 0o600)
    tmp.replace(vars_file)
