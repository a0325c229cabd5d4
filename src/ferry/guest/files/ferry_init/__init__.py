"""ferry-init: the guest's PID 1 (Debian's python3 -I, standard library only).

Mounts the API filesystems, sets hostname and static IPv4 from the kernel's
``ip=<client>::<gw>:<netmask>:<hostname>:<device>:off`` parameter, supervises
every executable in /etc/ferry/services.d, keeps a root shell on ttyS0, reaps
every zombie, and shuts down cleanly on the ACPI power button, SIGTERM, SIGINT
or SIGPWR (``ferry-poweroff`` sends SIGTERM).

The guest runs this package as one zipapp, /sbin/ferry-init, which the initramfs
execs; it never imports ``ferry``, and imports its own modules relatively so that
it works under whatever name it is loaded (``ferry_init`` in the guest).

Console marker lines (the host's tests and tools wait for them):
    ferry-guest: userspace reached
    ferry-guest: network up <ip> on <device>
    ferry-guest: power off
"""
