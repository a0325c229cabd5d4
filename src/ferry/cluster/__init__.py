"""The cluster store (etcd): host leases, ownership of domains and disks, the commit transaction."""
