"""Decoder of the pgoutput logical replication protocol (version 1, text tuple data); pure."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class PgoutputError(ValueError):
    """A message that is not valid pgoutput protocol version 1."""


class Toast(enum.Enum):
    """Marker for a TOASTed column whose value did not change (tuple kind 'u')."""

    UNCHANGED = "u"


Value = str | None | Literal[Toast.UNCHANGED]
Tuple = tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool  # part of the replica identity


@dataclass(frozen=True, slots=True)
class Relation:
    relation_id: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[RelationColumn, ...]


@dataclass(frozen=True, slots=True)
class Type:
    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation_id: int
    new: Tuple


@dataclass(frozen=True, slots=True)
class Update:
    relation_id: int
    old_kind: Literal["K", "O"] | None  # 'K' replica identity key only, 'O' whole old row
    old: Tuple | None
    new: Tuple


@dataclass(frozen=True, slots=True)
class Delete:
    relation_id: int
    old_kind: Literal["K", "O"]
    old: Tuple


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_ids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


Message = Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate


class _Reader:
    """Big-endian cursor over one message, raising PgoutputError when it runs short."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise PgoutputError(f"message truncated at byte {self.pos}")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return int(value)

    def byte(self) -> str:
        return chr(self._take("!B"))

    def int8(self) -> int:
        return self._take("!b")

    def int16(self) -> int:
        return self._take("!h")

    def int32(self) -> int:
        return self._take("!i")

    def uint32(self) -> int:
        return self._take("!I")

    def int64(self) -> int:
        return self._take("!q")

    def lsn(self) -> int:
        return self._take("!Q")

    def timestamp(self) -> datetime:
        return PG_EPOCH + timedelta(microseconds=self.int64())

    def string(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise PgoutputError(f"unterminated string at byte {self.pos}")
        text = self.data[self.pos : end].decode()
        self.pos = end + 1
        return text

    def text(self, length: int) -> str:
        if length < 0 or self.pos + length > len(self.data):
            raise PgoutputError(f"bad column length {length} at byte {self.pos}")
        text = self.data[self.pos : self.pos + length].decode()
        self.pos += length
        return text

    def tuple(self) -> Tuple:
        values: list[Value] = []
        for _ in range(self.int16()):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(Toast.UNCHANGED)
            elif kind == "t":
                values.append(self.text(self.int32()))
            else:
                raise PgoutputError(f"unsupported tuple column kind {kind!r}")
        return tuple(values)

    def done(self) -> None:
        if self.pos != len(self.data):
            raise PgoutputError(f"{len(self.data) - self.pos} trailing bytes")


def _relation(r: _Reader) -> Relation:
    relation_id = r.uint32()
    namespace = r.string() or "pg_catalog"  # the protocol sends "" for pg_catalog
    name = r.string()
    identity = r.byte()
    columns = []
    for _ in range(r.int16()):
        flags = r.int8()
        columns.append(RelationColumn(r.string(), r.uint32(), r.int32(), bool(flags & 1)))
    return Relation(relation_id, namespace, name, identity, tuple(columns))


def _old_kind(kind: str) -> Literal["K", "O"]:
    if kind == "K":
        return "K"
    if kind == "O":
        return "O"
    raise PgoutputError(f"expected old tuple marker K or O, got {kind!r}")


def _expect_new(r: _Reader, kind: str) -> Tuple:
    if kind != "N":
        raise PgoutputError(f"expected new tuple marker N, got {kind!r}")
    return r.tuple()


def _update(r: _Reader) -> Update:
    relation_id = r.uint32()
    kind = r.byte()
    if kind == "N":
        return Update(relation_id, None, None, r.tuple())
    old_kind = _old_kind(kind)
    old = r.tuple()
    return Update(relation_id, old_kind, old, _expect_new(r, r.byte()))


def _truncate(r: _Reader) -> Truncate:
    count = r.int32()
    options = r.int8()
    ids = tuple(r.uint32() for _ in range(count))
    return Truncate(ids, cascade=bool(options & 1), restart_identity=bool(options & 2))


def decode(data: bytes) -> Message:
    """Decode one pgoutput message (the payload of one XLogData message)."""
    r = _Reader(data)
    tag = r.byte()
    message: Message
    if tag == "B":
        message = Begin(r.lsn(), r.timestamp(), r.uint32())
    elif tag == "C":
        message = Commit(r.int8(), r.lsn(), r.lsn(), r.timestamp())
    elif tag == "O":
        message = Origin(r.lsn(), r.string())
    elif tag == "R":
        message = _relation(r)
    elif tag == "Y":
        message = Type(r.uint32(), r.string() or "pg_catalog", r.string())
    elif tag == "I":
        relation_id = r.uint32()
        message = Insert(relation_id, _expect_new(r, r.byte()))
    elif tag == "U":
        message = _update(r)
    elif tag == "D":
        relation_id = r.uint32()
        old_kind = _old_kind(r.byte())
        message = Delete(relation_id, old_kind, r.tuple())
    elif tag == "T":
        message = _truncate(r)
    else:
        raise PgoutputError(f"unknown pgoutput message type {tag!r}")
    r.done()
    return message
