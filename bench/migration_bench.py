"""ferry's live migration against a bare QMP migration of the same guest, side by side.

Run as root from the repository (the lab needs network namespaces)::

    .venv/bin/python bench/migration_bench.py [--reps N] [--scenarios idle,classic]
                                              [--out bench/results.json]

For each scenario one lab is brought up (``ferry.lab.lab.up``) and always torn
down again. Then, on the same guest and the same link:

1. ferry: ``ferry create`` on xen_host_1, then ``--reps`` live migrations with
   ``ferry migrate -l --json``, alternating direction (1->2, 2->1, 1->2, ...).
2. bare: ferry's VM is destroyed and two QEMUs are started by this script in
   the host namespaces with ferry's own command line (``build_qemu_args``,
   checked against the command line of ferry's own QEMU), on taps of our own on
   ``xenbr0``, the same disk, MAC and address. The migration is driven directly
   over QMP with the parameters ferry sets (downtime-limit 100 ms, max-bandwidth
   1<<40, auto-converge + events) over QEMU's own ``tcp:`` transport; the
   target is started with ``-incoming defer`` but without ``-S`` (autostart),
   so it resumes the guest as soon as the stream is loaded. Again ``--reps``
   migrations, alternating direction.

Scenarios: ``idle`` (idle guest, unshaped links) and ``classic`` (the player in
client_2 plays /clip.ogg during each migration, 100 Mbit links).

Downtime is source STOP -> target RESUME, both from QMP event timestamps (the
same wall clock: all QEMUs run on this machine). Times are noisy; compare the
ratios within one run.
"""

from __future__ import annotations

import sys

# Run as a script, this file's directory is first on sys.path: that is how the
# benchmark's own package, migbench, is found without being installed.
from migbench.main import main

if __name__ == "__main__":
    sys.exit(main())
