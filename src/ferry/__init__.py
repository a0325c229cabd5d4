"""ferry: live-migrate running QEMU virtual machines between Linux hosts."""

__version__ = "0.1.0"
