"""ExecScanner: Fly's exec answer parsed chunk by chunk, output capped, malformed input refused."""

from __future__ import annotations

import itertools
import json
import tracemalloc
from collections.abc import Iterable, Iterator

import pytest

from listener.exec_stream import ExecScanner, ExecStreamError
from listener.models import ExecResult

NO_CEILING = 1 << 40
TRICKY = 'a\u0000b"\\/\b\f\n\r\t é ☃ 😀 \U0010ffff \x7f end'


def scan(chunks: Iterable[bytes], limit: int = 65536, ceiling: int = NO_CEILING) -> ExecResult:
    scanner = ExecScanner(limit, ceiling)
    for chunk in chunks:
        scanner.feed(chunk)
    scanner.close()
    return scanner.result()


def pieces(body: bytes, size: int) -> Iterator[bytes]:
    return (body[i : i + size] for i in range(0, len(body), size))


def answer(**fields: object) -> bytes:
    """A body as Go's encoding/json writes it: non-ASCII escaped only where we ask below."""
    return json.dumps(fields).encode()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 1 << 20], ids=lambda n: f"chunks-of-{n}")
@pytest.mark.parametrize("ensure_ascii", [True, False], ids=["escaped", "raw-utf8"])
def test_any_chunking_gives_what_json_loads_gives(size: int, ensure_ascii: bool) -> None:
    fields = {"stderr": TRICKY[::-1], "exit_signal": 9, "stdout": TRICKY, "exit_code": 137}
    body = json.dumps(fields, ensure_ascii=ensure_ascii).encode()
    assert scan(pieces(body, size)) == ExecResult(137, TRICKY, TRICKY[::-1], 9)


def test_every_split_point_of_escapes_pairs_and_multibyte_characters() -> None:
    body = (
        b'{ "stdout" : "\\ud83d\\ude00\xf0\x9f\x98\x80\\u00e9\xc3\xa9\\n" , '
        b'"exit_code" : -12 , "x" : 1.5e+3 , "y" : false , "stderr" : null }'
    )
    expected = ExecResult(-12, "😀😀éé\n", "")
    for cut in range(len(body) + 1):
        assert scan([body[:cut], body[cut:]]) == expected, f"split at byte {cut}"


@pytest.mark.parametrize(
    "order", list(itertools.permutations(["exit_code", "exit_signal", "stdout", "stderr"]))
)
def test_keys_come_in_any_order(order: tuple[str, ...]) -> None:
    values = {"exit_code": 1, "exit_signal": 15, "stdout": "out", "stderr": "err"}
    body = answer(**{key: values[key] for key in order})
    assert scan([body]) == ExecResult(1, "out", "err", 15)


def test_missing_and_null_outputs_and_signal_are_empty() -> None:
    assert scan([b'{"exit_code":0,"stdout":null}']) == ExecResult(0, "", "", None)
    assert scan([b'{"exit_code":0,"exit_signal":null}']) == ExecResult(0)


def test_other_keys_with_scalar_values_are_skipped_and_the_last_repeat_wins() -> None:
    body = (
        b'{"note":"\\u0041 long \\" text","n":null,"t":true,"f":false,"z":-0.5E-7,'
        b'"stdout":"first","exit_code":0,"stdout":"second","' + b"k" * 200 + b'":"v"}'
    )
    assert scan([body]) == ExecResult(0, "second", "")


def test_a_long_key_that_starts_like_stdout_is_not_stdout() -> None:
    body = b'{"exit_code":0,"stdout' + b"x" * 40 + b'":"not it"}'
    assert scan([body]).stdout == ""


def test_empty_object_body_lacks_an_exit_code() -> None:
    with pytest.raises(ExecStreamError, match="no exit_code"):
        scan([b"  {  }  "])


# Truncation


@pytest.mark.parametrize(
    ("text", "limit", "kept", "cut"),
    [
        ("abcdef", 6, "abcdef", False),
        ("abcdef", 5, "abcde", True),
        ("", 0, "", False),
        ("a", 0, "", True),
        ("éééé", 5, "éé", True),  # 2 bytes each: the third would be split
        ("😀😀", 7, "😀", True),  # 4 bytes each
        ("a😀", 4, "a", True),
        ("\u0000\u0000", 2, "\u0000\u0000", False),  # 6 escaped characters, 1 byte of UTF-8 each
    ],
)
@pytest.mark.parametrize("ensure_ascii", [True, False], ids=["escaped", "raw-utf8"])
def test_output_keeps_whole_characters_within_the_limit(
    text: str, limit: int, kept: str, cut: bool, ensure_ascii: bool
) -> None:
    body = json.dumps({"exit_code": 0, "stdout": text}, ensure_ascii=ensure_ascii).encode()
    for size in (1, len(body)):
        result = scan(pieces(body, size), limit=limit)
        assert (result.stdout, result.stdout_truncated) == (kept, cut)
        assert len(result.stdout.encode()) <= limit


def test_each_output_has_its_own_limit_and_flag() -> None:
    result = scan([answer(stdout="x" * 10, stderr="y" * 3, exit_code=0)], limit=4)
    assert (result.stdout, result.stdout_truncated) == ("xxxx", True)
    assert (result.stderr, result.stderr_truncated) == ("yyy", False)


def test_exit_code_after_a_huge_stdout_is_read_without_holding_the_stdout() -> None:
    line = b"0123456789" * 7 + b"\\u0000\\t\\ud83d\\ude00\xc3\xa9\\n"  # 94 bytes, 5 escapes
    body = b'{"stdout":"' + line * 220_000 + b'","stderr":"e","exit_code":3,"exit_signal":0}'
    tracemalloc.start()
    try:
        result = scan(pieces(body, 65536), limit=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (result.exit_code, result.exit_signal, result.stderr) == (3, 0, "e")
    assert result.stdout_truncated and 996 <= len(result.stdout.encode()) <= 1000
    assert len(body) > 20_000_000
    assert peak < 1_000_000, f"held {peak} bytes while reading {len(body)}"


# Malformed answers


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"", "ended before"),
        (b"[]", "expected the answer to open an object"),
        (b'"exit_code"', "expected the answer to open an object"),
        (b'{"exit_code":0', "ended before"),
        (b'{"exit_code":0,}', "expected a key"),
        (b'{"exit_code" 0}', "expected ':'"),
        (b"{'exit_code':0}", "expected a key"),
        (b'{"exit_code":0 "stdout":""}', "expected ',' or '}'"),
        (b'{"exit_code":0}{}', "after the object"),
        (b'{"exit_code":0} x', "after the object"),
        (b'{"exit_code":01}', "expected ',' or '}'"),
        (b'{"exit_code":-}', "invalid or overlong number"),
        (b'{"exit_code":1' + b"0" * 40 + b"}", "invalid or overlong number"),
        (b'{"exit_code":"0"}', "exit_code is not an integer"),
        (b'{"exit_code":1.5}', "exit_code is not an integer"),
        (b'{"exit_code":true}', "exit_code is not an integer"),
        (b'{"exit_code":null}', "exit_code is not an integer"),
        (b'{"exit_code":0,"exit_signal":"9"}', "exit_signal is not an integer or null"),
        (b'{"exit_code":0,"stdout":5}', "stdout is not a string or null"),
        (b'{"exit_code":0,"stderr":false}', "stderr is not a string or null"),
        (b'{"exit_code":tru}', "invalid literal"),
        (b'{"exit_code":0,"x":nul}', "invalid literal"),
        (b'{"exit_code":0,"x":{}}', "only scalars are read"),
        (b'{"exit_code":0,"x":[1]}', "only scalars are read"),
        (b'{"exit_code":0,"stdout":"a\nb"}', "control character"),
        (b'{"exit_code":0,"stdout":"a\\xb"}', "invalid escape \\\\x"),
        (b'{"exit_code":0,"stdout":"\\u12g4"}', "invalid escape \\\\u12g4"),
        (b'{"exit_code":0,"stdout":"never closed}', "ended before"),
        (b'{"exit_code":0,"stdout":"\xff"}', "not UTF-8"),
        (b'{"exit_code":0,"stdout":"\xed\xa0\x80"}', "not UTF-8"),  # an encoded surrogate
        (b'{"exit_code":0,"stdout":"\xc3', "not UTF-8"),  # the body ends inside a character
    ],
)
def test_malformed_answers_are_refused_with_the_reason(body: bytes, problem: str) -> None:
    for size in (1, len(body) or 1):
        with pytest.raises(ExecStreamError, match=problem) as info:
            scan(pieces(body, size))
        assert "unparseable response from Fly" in str(info.value)


def test_malformed_input_in_the_skipped_part_of_a_long_output_is_still_refused() -> None:
    body = b'{"exit_code":0,"stdout":"' + b"x" * 100 + b'\\q"}'
    with pytest.raises(ExecStreamError, match=r"invalid escape \\q at character 125"):
        scan(pieces(body, 16), limit=10)


def test_lone_surrogates_become_replacement_characters() -> None:
    body = b'{"exit_code":0,"stdout":"\\ud83dA\\ude00\\ud83d\\u0041\\ud83d"}'
    assert scan(pieces(body, 1)).stdout == "\ufffdA\ufffd\ufffdA\ufffd"


# The ceiling


def test_a_body_up_to_the_ceiling_is_read_and_one_byte_more_is_refused() -> None:
    body = answer(exit_code=0, stdout="x" * 100)
    assert scan(pieces(body, 7), limit=10, ceiling=len(body)).stdout == "x" * 10
    with pytest.raises(ExecStreamError, match=f"over the {len(body) - 1}-byte ceiling"):
        scan(pieces(body, 7), limit=10, ceiling=len(body) - 1)


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        ExecScanner(-1, 10)
