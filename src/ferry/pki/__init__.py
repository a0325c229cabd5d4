"""The cluster CA, certificates, TLS contexts for ferry's channels and QEMU's TLS objects."""
