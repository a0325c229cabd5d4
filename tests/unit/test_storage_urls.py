"""URL disks reach only the storage servers a host's config allows."""

from __future__ import annotations

import pytest

from ferry.domain.config import DomainConfig
from ferry.errors import StorageError
from ferry.storage.disks import check_disks


def config(url: str) -> DomainConfig:
    return DomainConfig.from_mapping(
        {"name": "vm", "disk": [{"path": url, "target": "xvda", "mode": "w"}]}, "test"
    )


@pytest.mark.parametrize(
    "url", ["nfs://10.42.0.2/export/vm.img", "nbd://10.42.0.2:10809/vm", "nbd://NAS.lan/vm"]
)
def test_allowed_servers(url: str) -> None:
    check_disks(config(url), [], [], ["10.42.0.2", "nas.lan"])


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("nbd+unix:///vm?socket=/run/ferry/ferryd.sock", "nbd\\+unix:// disks are not allowed"),
        ("nbd://10.42.0.3:10809/vm", "10.42.0.3 is not one of this host's storage servers"),
        ("nfs://10.42.0.2/x?socket=/run/x", "may not name a socket"),
        ("iscsi:///iqn.x/0", "no host is not one of"),
    ],
)
def test_refused(url: str, why: str) -> None:
    with pytest.raises(StorageError, match=why):
        check_disks(config(url), [], [], ["10.42.0.2"])


def test_no_servers_configured_means_no_url_disks() -> None:
    with pytest.raises(StorageError, match="storage_servers: none configured"):
        check_disks(config("nfs://10.42.0.2/export/vm.img"), [], [], [])
