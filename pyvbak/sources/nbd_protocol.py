"""Wire constants and fixed layouts of the NBD protocol (the parts pyvbak's client uses).

Values are those of the NBD protocol document (doc/proto.md in the nbd project); all
integers on the wire are big-endian.  This module holds only data and tiny pure helpers
so the fake servers in the tests can share the exact layouts with the client.
"""

from __future__ import annotations

import struct

# --- handshake --------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0  # server handshake flags
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_NAMES = {
    REP_FLAG_ERROR | 1: "NBD_REP_ERR_UNSUP",
    REP_FLAG_ERROR | 2: "NBD_REP_ERR_POLICY",
    REP_FLAG_ERROR | 3: "NBD_REP_ERR_INVALID",
    REP_FLAG_ERROR | 4: "NBD_REP_ERR_PLATFORM",
    REP_FLAG_ERROR | 5: "NBD_REP_ERR_TLS_REQD",
    REP_FLAG_ERROR | 6: "NBD_REP_ERR_UNKNOWN",
    REP_FLAG_ERROR | 7: "NBD_REP_ERR_SHUTDOWN",
    REP_FLAG_ERROR | 8: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    REP_FLAG_ERROR | 9: "NBD_REP_ERR_TOO_BIG",
}

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags (NBD_INFO_EXPORT)
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8

# --- transmission -----------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3

REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2
REPLY_TYPE_ERROR_BIT = 1 << 15

# base:allocation status flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
# qemu:dirty-bitmap:NAME status flag
STATE_DIRTY = 1 << 0

# NBD error values are fixed by the protocol, not the platform's errno numbering.
NBD_ERRNO_NAMES = {
    1: "EPERM",
    5: "EIO",
    12: "ENOMEM",
    22: "EINVAL",
    28: "ENOSPC",
    75: "EOVERFLOW",
    95: "ENOTSUP",
    108: "ESHUTDOWN",
}

# --- fixed layouts ----------------------------------------------------------------------
S_SERVER_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
S_CLIENT_FLAGS = struct.Struct(">I")
S_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
S_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
S_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
S_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
S_STRUCTURED_TAIL = struct.Struct(">HHQI")  # after the magic: flags, type, handle, length
S_U16 = struct.Struct(">H")
S_U32 = struct.Struct(">I")
S_U64 = struct.Struct(">Q")
S_INFO_EXPORT = struct.Struct(">HQH")  # type, size, transmission flags
S_INFO_BLOCK_SIZE = struct.Struct(">HIII")  # type, minimum, preferred, maximum
S_HOLE = struct.Struct(">QI")  # offset, hole length
S_ERROR = struct.Struct(">IH")  # error, message length
S_EXTENT = struct.Struct(">II")  # length, status flags

# The largest read payload a client may assume without NBD_INFO_BLOCK_SIZE.
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024


def errno_name(value: int) -> str:
    return NBD_ERRNO_NAMES.get(value, f"error {value}")


def rep_name(value: int) -> str:
    if value in REP_ERR_NAMES:
        return REP_ERR_NAMES[value]
    if value & REP_FLAG_ERROR:
        return f"NBD_REP_ERR {value & ~REP_FLAG_ERROR}"
    return f"reply type {value}"


def option_payload_go(export: str, infos: tuple[int, ...]) -> bytes:
    name = export.encode()
    return S_U32.pack(len(name)) + name + S_U16.pack(len(infos)) + b"".join(S_U16.pack(i) for i in infos)


def option_payload_meta(export: str, queries: list[str]) -> bytes:
    name = export.encode()
    parts = [S_U32.pack(len(name)), name, S_U32.pack(len(queries))]
    for q in queries:
        qb = q.encode()
        parts += [S_U32.pack(len(qb)), qb]
    return b"".join(parts)
