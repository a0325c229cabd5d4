"""The one exception tree of ferry.

Every error ferry raises on purpose is a :class:`FerryError`. Its message is a
single line that says what was attempted, on which domain or host, and why it
failed; the CLI prints exactly that line and exits non-zero.

::

    FerryError
     +-- ConfigError            a config file or value is malformed or impossible
     +-- DomainError            a domain-level request cannot be honoured
     |    +-- DomainNotFound    no domain of that name on this host
     |    +-- DomainExists      a domain of that name already exists here
     |    +-- InvalidTransition the lifecycle state machine forbids the request
     +-- HypervisorError        QEMU could not be started, driven or stopped
     |    +-- QemuLaunchError   QEMU refused to start (its own message is kept)
     |    +-- QmpError          a QMP command failed or the monitor went away
     |    +-- AccelError        the requested accelerator is unusable here
     +-- NetworkError           bridges, tap devices, addresses
     +-- StorageError           disks that are missing or outside storage roots
     +-- ImageError             building or using the guest image failed
 +-- PkiError               the cluster CA, a certificate or a TLS peer is not valid
     +-- ClusterError           the cluster store (etcd) refused or could not answer
     |    +-- ClusterUnavailable no etcd member answered in time (quorum lost?)
     |    +-- OwnedElsewhere    the domain or one of its disks belongs to another host
     +-- WaitTimeout            a state awaited (util.wait) did not come in time
     +-- DaemonError            talking to ferryd failed
     |    +-- DaemonUnreachable no ferryd answers on the control socket
     |    +-- ProtocolError     a malformed request or reply on the control API
     |    +-- AccessDenied      the caller's certificate does not allow the request
     +-- MigrationError         a migration failed; the VM runs on the source
          +-- MigrationRefused  the target (or its hosts-allow) said no
          +-- MigrationAborted  cancelled by the user
          +-- MigrationInDoubt  the commit's answer was lost; the VM is held
                                paused on the source until the target answers

Errors cross the control API as ``{"type": <class name>, "message": ...}`` and
are rebuilt on the client side by :func:`error_from_wire`, so the CLI shows the
daemon's own one-line reason.
"""

from __future__ import annotations


class FerryError(Exception):
    """Root of every error ferry raises on purpose."""


class ConfigError(FerryError):
    """A config file or value is malformed, unknown or impossible."""


class DomainError(FerryError):
    """A domain-level request cannot be honoured."""


class DomainNotFound(DomainError):
    """No domain of that name exists on this host."""


class DomainExists(DomainError):
    """A domain of that name already exists on this host."""


class InvalidTransition(DomainError):
    """The domain's lifecycle state does not allow the request."""


class HypervisorError(FerryError):
    """QEMU could not be started, driven or stopped."""


class QemuLaunchError(HypervisorError):
    """QEMU refused to start."""


class QmpError(HypervisorError):
    """A QMP command failed or the monitor connection was lost."""


class AccelError(HypervisorError):
    """The requested accelerator cannot be used on this host."""


class NetworkError(FerryError):
    """A bridge, tap device or address problem."""


class StorageError(FerryError):
    """A disk is missing, unreadable or outside the configured storage roots."""


class ImageError(FerryError):
    """Building or using the guest image failed."""


class PkiError(FerryError):
    """The cluster CA, a certificate, a key or a TLS peer is missing or not valid."""


class ClusterError(FerryError):
    """The cluster store refused a request or could not answer it."""


class ClusterUnavailable(ClusterError):
    """No etcd member answered in time: the store, or this host's link to it, is down."""


class OwnedElsewhere(ClusterError):
    """The domain or one of its disks is owned by another host (or another domain)."""


class WaitTimeout(FerryError):
    """A state that was awaited did not come before the caller's deadline."""


class DaemonError(FerryError):
    """Talking to ferryd failed."""


class DaemonUnreachable(DaemonError):
    """No ferryd answers on the control socket."""


class ProtocolError(DaemonError):
    """A malformed request or reply on the control API."""


class AccessDenied(DaemonError):
    """The caller's certificate (a viewer's, say) does not allow the request."""


def _all_subclasses(cls: type[FerryError]) -> dict[str, type[FerryError]]:
    found: dict[str, type[FerryError]] = {cls.__name__: cls}
    for sub in cls.__subclasses__():
        found.update(_all_subclasses(sub))
    return found


def error_to_wire(err: FerryError) -> dict[str, str]:
    return {"type": type(err).__name__, "message": str(err)}


def error_from_wire(data: object) -> FerryError:
    """Rebuild an error sent by the daemon; unknown types become FerryError."""
    if not isinstance(data, dict):
        return ProtocolError(f"daemon sent a malformed error: {data!r}")
    kind = _all_subclasses(FerryError).get(str(data.get("type")), FerryError)
    return kind(str(data.get("message", "unknown error")))


class MigrationError(FerryError):
    """A migration failed before its commit; the VM keeps running on the source."""


class MigrationRefused(MigrationError):
    """The target refused the domain, or its hosts-allow refused this host.

    ``reason`` is one word from :data:`REFUSAL_REASONS`, for the target's
    metrics (a label must come from a small fixed set, never from a message).
    """

    def __init__(self, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason if reason in REFUSAL_REASONS else "other"


REFUSAL_REASONS = (
    "access",  # hosts-allow, a certificate that is not a host's, or not valid here
    "protocol",  # a malformed or unexpected request
    "exists",  # a domain of that name runs here, or is arriving already
    "busy",  # too many migrations arriving at once
    "replay",  # a migration id seen before
    "config",  # the domain's config does not parse here
    "storage",  # its disks are not usable here
    "network",  # its bridges are missing here
    "capacity",  # not enough memory here, or no usable accelerator
    "ownership",  # the cluster says the domain or a disk belongs elsewhere
    "unlike",  # the disks or boot files would not be the very same here
    "stream",  # the memory stream could not be set up
    "other",
)


def refusal_reason(err: FerryError) -> str:
    """The refusal reason for a target's check that failed with ``err``."""
    if isinstance(err, MigrationRefused):
        return err.reason
    kinds: tuple[tuple[type[FerryError], str], ...] = (
        (ConfigError, "config"),
        (StorageError, "storage"),
        (ImageError, "storage"),
        (NetworkError, "network"),
        (ClusterError, "ownership"),
        (HypervisorError, "capacity"),
    )
    return next((reason for kind, reason in kinds if isinstance(err, kind)), "other")


class MigrationAborted(MigrationError):
    """The migration was cancelled by the user."""


class PostcopyFailed(FerryError):
    """Post-copy broke after the switch: the target had committed and lacks pages
    that only the source had. The domain is lost (the weaker guarantee of
    ``--postcopy``)."""


class MigrationInDoubt(MigrationError):
    """The commit was sent but its answer lost: the VM stays paused on the source
    until the target says whether it resumed the VM."""
