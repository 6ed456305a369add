import shutil
import subprocess
import uuid

import pytest

from nbd_postcopy.common.units import PAGE_SIZE
from nbd_postcopy.device import swapheader


def test_header_fields_at_kernel_offsets():
    swap_uuid = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
    page = swapheader.build(1000, swap_uuid, "postcopy")
    assert len(page) == PAGE_SIZE
    assert page[:1024] == bytes(1024)
    assert int.from_bytes(page[1024:1028], "little") == 1  # version
    assert int.from_bytes(page[1028:1032], "little") == 999  # last_page
    assert int.from_bytes(page[1032:1036], "little") == 0  # nr_badpages
    assert page[1036:1052] == swap_uuid.bytes
    assert page[1052:1068] == b"postcopy" + bytes(8)
    assert page[-10:] == b"SWAPSPACE2"
    assert swapheader.parse(page) == {
        "version": 1, "last_page": 999, "nr_badpages": 0, "uuid": swap_uuid, "label": "postcopy",
    }  # fmt: skip


def test_bad_geometry_and_label_are_refused():
    with pytest.raises(ValueError, match="between"):
        swapheader.build(1, uuid.uuid4())
    with pytest.raises(ValueError, match="longer than 16"):
        swapheader.build(10, uuid.uuid4(), "x" * 17)
    with pytest.raises(ValueError, match="SWAPSPACE2"):
        swapheader.parse(bytes(PAGE_SIZE))


@pytest.mark.skipif(shutil.which("blkid") is None, reason="needs blkid")
def test_blkid_recognises_the_header(tmp_path):
    """util-linux reads our header as a swap area with our UUID and label (the real swapon is in
    tests/device/test_plugin.py)."""
    swap_uuid = uuid.uuid4()
    image = tmp_path / "swap.img"
    image.write_bytes(swapheader.build(64, swap_uuid, "pc-test") + bytes(63 * PAGE_SIZE))
    out = subprocess.run(["blkid", "-p", "-o", "export", str(image)], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split("=", 1) for line in out.split())
    assert fields["TYPE"] == "swap"
    assert fields["UUID"] == str(swap_uuid)
    assert fields["LABEL"] == "pc-test"
    assert fields["VERSION"] == "1"
