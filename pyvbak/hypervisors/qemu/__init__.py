"""QEMU/KVM control plane: QMP client, hot backup sessions (image fleecing + persistent
dirty bitmaps), powered-off images via qemu-nbd, and cleanup of killed runs.

See docs/QEMU.md.
"""

from .hot import QemuHotBackup, parse_qemu_uri
from .offline import QemuOfflineImage
from .qmp import QmpClient, QmpError

__all__ = ["QemuHotBackup", "QemuOfflineImage", "QmpClient", "QmpError", "parse_qemu_uri"]
