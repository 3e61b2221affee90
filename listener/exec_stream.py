"""ExecScanner: Fly's exec answer parsed as it arrives, keeping only bounded output and the exit."""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable

from listener.models import ExecResult

KEY_LIMIT_BYTES = 32  # longer keys are none of the four we read
NUMBER_LIMIT_CHARS = 40
OUTPUTS = frozenset({"stdout", "stderr"})
_WS = re.compile(r"[ \t\n\r]*")
_SPECIAL = re.compile(r'["\\\x00-\x1f]')
# A run of string content, escapes included, matched in C: possessive (nothing is retained)
# and unrolled (plain (escape plain)*), which runs about twice as fast as an alternation.
_SKIP = re.compile(r'[^"\\\x00-\x1f]*+(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*+)*+')
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_PREFIX = re.compile(r"-?(?:0|[1-9][0-9]*)?(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?")
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}
_LITERALS: tuple[tuple[str, bool | None], ...] = (("true", True), ("false", False), ("null", None))


class ExecStreamError(ValueError):
    """The exec answer is not the JSON object Fly sends, or is larger than the ceiling."""


class _Text:
    """A JSON string's value as it is decoded: at most `limit_bytes` of UTF-8, whole characters."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.kept = bytearray()
        self.truncated = False

    def add(self, text: str) -> None:
        """Append `text`, or as many of its characters as fit (then the value is truncated)."""
        if self.truncated or not text:
            return
        room = self.limit_bytes - len(self.kept)
        raw = text[: room + 1].encode()  # enough to tell: a character is at least one byte
        if len(raw) > room:
            while room and (raw[room] & 0xC0) == 0x80:  # back to a character's start
                room -= 1
            raw, self.truncated = raw[:room], True
        self.kept += raw

    @property
    def value(self) -> str:
        return self.kept.decode()


Value = _Text | int | float | bool | None


def _is_int(value: Value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_FIELDS: dict[str, tuple[str, Callable[[Value], bool]]] = {
    "exit_code": ("an integer", _is_int),
    "exit_signal": ("an integer or null", lambda v: v is None or _is_int(v)),
    "stdout": ("a string or null", lambda v: v is None or isinstance(v, _Text)),
    "stderr": ("a string or null", lambda v: v is None or isinstance(v, _Text)),
}


class ExecScanner:
    """Push parser for `{"exit_code":…,"exit_signal":…,"stdout":"…","stderr":"…"}` in any key
    order (other keys with scalar values are skipped): `feed` the body's chunks, `close`, then
    `result`. Holds at most `output_limit_bytes` of each output and a few dozen characters of
    pending input; raises ExecStreamError on malformed input or past `body_limit_bytes` read."""

    def __init__(self, output_limit_bytes: int, body_limit_bytes: int) -> None:
        if output_limit_bytes < 0 or body_limit_bytes < 0:
            raise ValueError("output_limit_bytes and body_limit_bytes must be >= 0")
        self._output_limit_bytes = output_limit_bytes
        self._body_limit_bytes = body_limit_bytes
        self._read_bytes = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buf = ""
        self._pos = 0
        self._offset = 0  # characters consumed before _buf
        self._state: Callable[[], bool] = self._open
        self._key = ""
        self._text = _Text(0)
        self._fields: dict[str, Value] = {}

    def feed(self, chunk: bytes) -> None:
        """Parse the next piece of the body."""
        self._read_bytes += len(chunk)
        if self._read_bytes > self._body_limit_bytes:
            raise ExecStreamError(
                f"response from Fly over the {self._body_limit_bytes}-byte ceiling; reading stopped"
            )
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError:
            raise ExecStreamError("unparseable response from Fly (not UTF-8)") from None
        self._offset += self._pos
        self._buf = self._buf[self._pos :] + text
        self._pos = 0
        while self._state():
            pass

    def close(self) -> None:
        """The body has ended: it must have been one whole object."""
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ExecStreamError("unparseable response from Fly (not UTF-8)") from None
        if self._state != self._end:
            raise self._error("the answer ended before its object closed")
        if "exit_code" not in self._fields:
            raise self._error("no exit_code")

    def result(self) -> ExecResult:
        """What the closed answer said."""
        exit_code, exit_signal = self._fields["exit_code"], self._fields.get("exit_signal")
        assert isinstance(exit_code, int) and isinstance(exit_signal, int | None)
        stdout, stderr = (self._fields.get(key) or _Text(0) for key in ("stdout", "stderr"))
        assert isinstance(stdout, _Text) and isinstance(stderr, _Text)
        return ExecResult(
            exit_code,
            stdout.value,
            stderr.value,
            exit_signal,
            stdout_truncated=stdout.truncated,
            stderr_truncated=stderr.truncated,
        )

    # States: each consumes one token and returns True, or False when it needs more input.

    def _open(self) -> bool:
        return self._punctuation("{", "the answer to open an object", self._first_key)

    def _first_key(self) -> bool:
        if (char := self._peek()) is None:
            return False
        if char == "}":
            self._pos += 1
            self._state = self._end
            return True
        return self._key_start(char)

    def _next_key(self) -> bool:
        if (char := self._peek()) is None:
            return False
        return self._key_start(char)

    def _key_start(self, char: str) -> bool:
        self._expect(char, '"', "a key")
        self._text = _Text(KEY_LIMIT_BYTES)
        self._state = self._key_string
        return True

    def _key_string(self) -> bool:
        if not self._string():
            return False
        self._key = "" if self._text.truncated else self._text.value
        self._state = self._colon
        return True

    def _colon(self) -> bool:
        return self._punctuation(":", "':' after a key", self._value)

    def _value(self) -> bool:
        if (char := self._peek()) is None:
            return False
        if char == '"':
            self._pos += 1
            limit = self._output_limit_bytes if self._key in OUTPUTS else 0
            self._text = _Text(limit)
            self._state = self._string_value
            return True
        if char in "tfn":
            return self._literal()
        if char in "-0123456789":
            return self._number()
        raise self._error(f"unexpected {char!r} as a value (only scalars are read)")

    def _string_value(self) -> bool:
        if not self._string():
            return False
        self._set(self._text)
        return True

    def _after_value(self) -> bool:
        if (char := self._peek()) is None:
            return False
        if char not in ",}":
            raise self._error(f"expected ',' or '}}' after a value, not {char!r}")
        self._pos += 1
        self._state = self._next_key if char == "," else self._end
        return True

    def _end(self) -> bool:
        if (char := self._peek()) is None:
            return False
        raise self._error(f"unexpected {char!r} after the object")

    # Tokens

    def _peek(self) -> str | None:
        """The next non-blank character (not consumed), or None if none has arrived yet."""
        match = _WS.match(self._buf, self._pos)
        assert match is not None  # `*` always matches
        self._pos = match.end()
        return self._buf[self._pos] if self._pos < len(self._buf) else None

    def _punctuation(self, wanted: str, what: str, then: Callable[[], bool]) -> bool:
        """The state that takes `wanted` (or fails, naming `what`) and moves on to `then`."""
        if (char := self._peek()) is None:
            return False
        self._expect(char, wanted, what)
        self._state = then
        return True

    def _expect(self, char: str, wanted: str, what: str) -> None:
        if char != wanted:
            raise self._error(f"expected {what}, not {char!r}")
        self._pos += 1

    def _string(self) -> bool:
        """String content up to and including its closing quote, into `_text`."""
        buf, text = self._buf, self._text
        while True:
            if text.truncated:
                match = _SKIP.match(buf, self._pos)
                assert match is not None  # `*+` always matches
                self._pos = match.end()
            else:
                special = _SPECIAL.search(buf, self._pos)
                end = special.start() if special else len(buf)
                text.add(buf[self._pos : end])
                self._pos = end
            if self._pos == len(buf):
                return False
            char = buf[self._pos]
            if char == '"':
                self._pos += 1
                return True
            if char != "\\":
                raise self._error(f"control character {char!r} in a string")
            if not self._escape():
                return False

    def _escape(self) -> bool:
        """One escape sequence (a surrogate pair as one character), into `_text`."""
        buf, pos = self._buf, self._pos
        if pos + 2 > len(buf):
            return False
        kind = buf[pos + 1]
        if kind != "u":
            if kind not in _ESCAPES:
                raise self._error(f"invalid escape \\{kind}")
            self._text.add(_ESCAPES[kind])
            self._pos += 2
            return True
        if pos + 6 > len(buf):
            return False
        code, width = self._hex4(pos + 2), 6
        if 0xD800 <= code < 0xDC00:
            if pos + 12 > len(buf) and "\\u".startswith(buf[pos + 6 : pos + 8]):
                return False  # the low half may be on its way
            if buf[pos + 6 : pos + 8] == "\\u" and 0xDC00 <= (low := self._hex4(pos + 8)) < 0xE000:
                code, width = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00), 12
        lone = 0xD800 <= code < 0xE000
        self._text.add("\ufffd" if lone else chr(code))  # as Go decodes a lone surrogate
        self._pos += width
        return True

    def _hex4(self, pos: int) -> int:
        digits = self._buf[pos : pos + 4]
        if not _HEX4.fullmatch(digits):
            raise self._error(f"invalid escape \\u{digits}")
        return int(digits, 16)

    def _number(self) -> bool:
        rest = self._buf[self._pos : self._pos + NUMBER_LIMIT_CHARS + 1]
        if len(rest) <= NUMBER_LIMIT_CHARS and _NUMBER_PREFIX.fullmatch(rest):
            return False  # it may go on in the next chunk
        match = _NUMBER.match(rest)
        if match is None or match.end() > NUMBER_LIMIT_CHARS:
            raise self._error("invalid or overlong number")
        token = match.group()
        self._pos += len(token)
        self._set(int(token) if _INTEGER.fullmatch(token) else float(token))
        return True

    def _literal(self) -> bool:
        rest = self._buf[self._pos : self._pos + 5]
        for word, value in _LITERALS:
            if rest.startswith(word):
                self._pos += len(word)
                self._set(value)
                return True
            if word.startswith(rest):
                return False
        raise self._error(f"invalid literal {rest!r}")

    def _set(self, value: Value) -> None:
        """Keep a value of one of the four keys (repeated: the last wins); then a ',' or '}'."""
        if self._key in _FIELDS:
            expected, fits = _FIELDS[self._key]
            if not fits(value):
                raise self._error(f"{self._key} is not {expected}")
            self._fields[self._key] = value
        self._state = self._after_value

    def _error(self, problem: str) -> ExecStreamError:
        at = self._offset + self._pos
        return ExecStreamError(f"unparseable response from Fly ({problem} at character {at})")
