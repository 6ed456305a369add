import pytest

from nbd_postcopy.device.markers import HEADER_SIZE, KeyFileError, MarkerCodec, load_key, looks_like_marker


def test_marker_round_trip():
    codec = MarkerCodec(b"k" * 32)
    page = codec.page(123456789)
    assert len(page) == 4096 and any(page)
    assert codec.parse(page) == 123456789
    assert codec.parse(memoryview(page)) == 123456789


def test_forged_and_foreign_markers_are_data():
    codec = MarkerCodec(b"k" * 32)
    page = bytearray(codec.page(7))
    page[HEADER_SIZE - 1] ^= 1  # bad MAC
    assert codec.parse(page) is None and looks_like_marker(page)
    other_key = MarkerCodec(b"x" * 32)
    assert codec.parse(other_key.page(7)) is None
    other_migration = MarkerCodec(b"k" * 32, migration_id=b"m" * 16)
    assert codec.parse(other_migration.page(7)) is None
    assert codec.parse(bytes(4096)) is None


def test_index_is_covered_by_mac():
    codec = MarkerCodec(b"k" * 32)
    page = bytearray(codec.page(1))
    page[24] = 2
    assert codec.parse(page) is None


def test_key_file_errors(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(KeyFileError, match="at least 16"):
        load_key(short)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_key(tmp_path / "missing")
    good = tmp_path / "good"
    good.write_bytes(bytes(range(32)))
    assert MarkerCodec.from_file(good).parse(MarkerCodec(bytes(range(32))).page(5)) == 5
