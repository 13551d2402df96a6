"""pyvbak: hot, deduplicated, compressed, forever-incremental backups of VM disks."""

import os as _os

# numpy's OpenBLAS starts one spinning worker thread per core when numpy is imported;
# pyvbak does no linear algebra, and on 2 cores that idle spinning took 2-3 % of a full
# backup's and 3 % of a restore's CPU samples (perf).  Set before
# any pyvbak module imports numpy; an explicit setting by the user wins.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
