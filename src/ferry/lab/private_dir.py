"""Run a command with a directory of its own at a shared path: a lab host's local disks.

On real hosts, a disk under ``/var/lib/ferry/local`` is on each host's own
file system: the same path, different files. The lab's hosts share this
machine's file system, so each host's ferryd (and the QEMUs and fencer it
starts) sees its own directory bind-mounted over the common path, in the
mount namespace ``ip netns exec`` made for it (a slave of the machine's:
the mount goes nowhere else).

    python -m ferry.lab.private_dir OWN_DIR SHARED_PATH -- COMMAND ...
"""

from __future__ import annotations

import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m ferry.lab.private_dir OWN_DIR SHARED_PATH -- COMMAND ...",
              file=sys.stderr)  # fmt: skip
        return 2
    own, shared, command = argv[0], argv[1], argv[3:]
    # Private first: whatever ip netns exec left shared, this mount stays here.
    subprocess.run(["mount", "--make-rslave", "/"], check=True)
    subprocess.run(["mount", "--bind", own, shared], check=True)
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
