"""ferry-init's entry point: ``python3 -I /sbin/ferry-init`` runs this as ``__main__``."""

from __future__ import annotations

import os
import sys

from .console import say
from .network import kernel_params, setup_network
from .services import discover_children
from .supervisor import Init
from .system import mount_api_filesystems, power_off


def main() -> int:
    if os.getpid() != 1:
        print("ferry-init: must run as PID 1", file=sys.stderr)
        return 1
    os.umask(0o022)
    os.chdir("/")
    mount_api_filesystems()
    init = Init()
    say("userspace reached")
    setup_network(kernel_params())
    init.run(discover_children())


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BaseException as err:  # PID 1 must not die: report and power off instead
        if isinstance(err, SystemExit) and os.getpid() != 1:
            raise
        say(f"fatal error in ferry-init: {type(err).__name__}: {err}")
        power_off()
