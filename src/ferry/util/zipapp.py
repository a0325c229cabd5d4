"""Deterministic zipapps: equal sources give equal bytes, so the guest image digest stays honest.

Used for every multi-file program ferry ships into the guest (its init, the
media server).

Python's own ``zipapp`` module stamps each entry with its file's mtime; here every
entry gets the same fixed time and mode, entries are sorted, and nothing is
compressed (a different zlib could otherwise change the bytes).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping

# The earliest time a zip entry can carry: any fixed value would do.
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_MODE = 0o100644  # a regular file, rw-r--r--, in the high 16 bits of external_attr


def build(entries: Mapping[str, bytes], interpreter: str) -> bytes:
    """An executable zipapp: ``#!interpreter``, then a zip of ``entries`` (name -> content).

    ``entries`` must hold ``__main__.py`` at the top: Python runs it when it runs the file.
    """
    if "__main__.py" not in entries:
        raise ValueError(f"zipapp for {interpreter}: no __main__.py among {sorted(entries)}")
    out = io.BytesIO()
    out.write(f"#!{interpreter}\n".encode())
    # Entries are located from the end of the archive, so the shebang in front is harmless.
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.create_system = 3  # Unix, whatever the build host: it gives the mode meaning
            info.external_attr = _MODE << 16
            archive.writestr(info, entries[name])
    return out.getvalue()
