"""The one JSON Lines reader (pruning.jsonlines) behind calibration files, benchmarks and result logs."""

from __future__ import annotations

import pytest

from pruning.jsonlines import JsonLineError, json_lines, read_text


def test_lines_are_numbered_from_one_blank_lines_skipped_and_split_at_newlines_only():
    text = '{"a": 1}\n\n  \n{"b": "x\u2028y\x85z"}\r\n[3]'  # U+2028 / NEL inside a string: not line breaks
    assert list(json_lines(text)) == [(1, {"a": 1}), (4, {"b": "x\u2028y\x85z"}), (5, [3])]


def test_a_bad_line_names_its_number_and_the_decoder_message():
    with pytest.raises(JsonLineError) as caught:
        list(json_lines('{"a": 1}\n{"b": \n'))
    assert (caught.value.number, caught.value.msg, caught.value.colno, caught.value.too_deep) == (
        2, "Expecting value", 7, False)


def test_a_line_nested_too_deeply_is_a_json_line_error():
    with pytest.raises(JsonLineError) as caught:
        list(json_lines("{}\n" + "[" * 100_000 + "]" * 100_000))
    assert caught.value.number == 2 and caught.value.too_deep


def test_read_text_raises_the_callers_error_for_text_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"q": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(LookupError, match="byte 10") as caught:
        read_text(path, lambda err: LookupError(f"byte {err.start}"))
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert read_text(_utf8(tmp_path), LookupError) == '{"q": "café"}'


def _utf8(tmp_path):
    path = tmp_path / "utf8.jsonl"
    path.write_text('{"q": "café"}', encoding="utf-8")
    return path
