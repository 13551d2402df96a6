"""pyvbak: hot, deduplicated, compressed, forever-incremental backups of VM disks."""

__version__ = "0.1.0"
