"""The snapshot directory without QEMU: sparse copy, checksums, manifest, atomic finish, refusals."""

from __future__ import annotations

import json
import os

import pytest

from nbd_postcopy.common.units import PAGE_SIZE
from nbd_postcopy.migration import snapshotdir
from nbd_postcopy.migration.snapshotdir import Manifest, SnapshotError

P = PAGE_SIZE


def ram_image(tmp_path, pages=600):
    """A sparse file: data pages, all-zero pages written as data, and holes."""
    path = tmp_path / "guest.ram"
    with open(path, "wb") as out:
        out.truncate(pages * P)
        for page in (0, 1, 2, 300, 599):
            out.seek(page * P)
            out.write(bytes([page % 251 + 1]) * P)
        out.seek(10 * P)
        out.write(bytes(20 * P))  # allocated, but zeros
    return path


@pytest.mark.parametrize("seek_data", [True, False])
def test_the_copy_is_exact_and_zero_pages_are_holes(tmp_path, seek_data):
    source = ram_image(tmp_path)
    target = tmp_path / "ram"
    with open(source, "rb") as f:
        stats = snapshotdir.copy_sparse(f.fileno(), 0, 600 * P, target, seek_data=seek_data)
    assert target.read_bytes() == source.read_bytes()
    assert stats.bytes == 600 * P and stats.data_bytes == 5 * P
    assert os.stat(target).st_blocks * 512 <= 8 * P  # 5 pages of data (a filesystem may round up a little)


def test_a_copy_from_an_offset_in_the_source(tmp_path):
    source = ram_image(tmp_path)
    with open(source, "rb") as f:
        snapshotdir.copy_sparse(f.fileno(), 300 * P, 300 * P, tmp_path / "ram")
    assert (tmp_path / "ram").read_bytes() == source.read_bytes()[300 * P :]


def make_snapshot(tmp_path, name="snap"):
    directory = tmp_path / name
    partial = snapshotdir.begin(directory)
    (partial / "state").write_bytes(b"QEVM device state")
    (partial / "ram").write_bytes(b"\1" * P + bytes(P))
    manifest = Manifest(
        memdev="ram0", machine={"type": "pc-i440fx-7.2-machine", "ram_bytes": 2 * P, "vcpus": 1},
        ram={"file": "ram", "bytes": 2 * P, "data_bytes": P, "sha256": snapshotdir.file_sha256(partial / "ram")},
        state={"file": "state", "bytes": 17, "sha256": snapshotdir.file_sha256(partial / "state")},
    )
    snapshotdir.finish(partial, directory, manifest)
    return directory, manifest


def test_a_finished_snapshot_loads_and_verifies(tmp_path):
    directory, manifest = make_snapshot(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]  # no partial directory left
    loaded = snapshotdir.load(directory)
    assert loaded == manifest
    snapshotdir.verify(directory, loaded)
    assert oct(os.stat(directory / "ram").st_mode & 0o777) == "0o444"


def test_a_directory_without_a_manifest_is_not_a_snapshot(tmp_path):
    partial = snapshotdir.begin(tmp_path / "snap")
    (partial / "ram").write_bytes(b"x")
    with pytest.raises(SnapshotError, match="is not a snapshot: it has no manifest.json"):
        snapshotdir.load(partial)


def test_an_existing_snapshot_is_not_overwritten(tmp_path):
    directory, _ = make_snapshot(tmp_path)
    with pytest.raises(SnapshotError, match="already exists and is not empty"):
        snapshotdir.begin(directory)
    (tmp_path / "empty").mkdir()
    make_snapshot(tmp_path, "empty")  # an empty directory is fine


def test_truncated_and_tampered_files_are_refused(tmp_path):
    directory, _ = make_snapshot(tmp_path)
    os.chmod(directory / "state", 0o644)
    with open(directory / "state", "r+b") as f:
        f.truncate(5)
    with pytest.raises(SnapshotError, match=r"has 5 bytes, the manifest says 17: truncated; refused"):
        snapshotdir.load(directory)

    directory, _ = make_snapshot(tmp_path, "other")
    os.chmod(directory / "ram", 0o644)
    with open(directory / "ram", "r+b") as f:
        f.seek(P + 7)
        f.write(b"\1")
    manifest = snapshotdir.load(directory)  # same size: only the checksum sees it
    with pytest.raises(SnapshotError, match="RAM file .* does not match its checksum"):
        snapshotdir.verify(directory, manifest)


def test_bad_manifests_say_what_is_wrong(tmp_path):
    directory, _ = make_snapshot(tmp_path)
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    for change, message in [
        (lambda d: d.update(version=99), "has version 99"),
        (lambda d: d.update(format="other"), "is not an nbd-postcopy snapshot manifest"),
        (lambda d: d["ram"].pop("sha256"), "lacks 'sha256'"),
        (lambda d: d.pop("machine"), "lacks 'machine'"),
        (lambda d: d["machine"].update(ram_bytes=4 * P), "the machine's RAM is 16384 bytes, the RAM file's 8192"),
    ]:
        bad = json.loads(json.dumps(data))
        change(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(SnapshotError, match=message):
            snapshotdir.load(directory)
    path.write_text("{")
    with pytest.raises(SnapshotError, match="is not valid JSON"):
        snapshotdir.load(directory)


def test_a_failed_write_of_the_snapshot_reaches_callers_as_one_line(tmp_path, monkeypatch):
    """snapshot() callers other than the CLI get a MigrateError that says why, never a raw OSError
    (the end-to-end full-disk tests are in test_restore.py)."""
    from nbd_postcopy.migration.destination import MigrateError
    from nbd_postcopy.migration.snapshot import SnapshotOptions, _Snapshot

    job = _Snapshot(SnapshotOptions(tmp_path / "qmp.sock", tmp_path / "snap"))

    def full_disk(qmp):
        raise OSError(28, "No space left on device", str(tmp_path / "snap.partial" / "manifest.json"))

    monkeypatch.setattr(job, "_steps", full_disk)
    with pytest.raises(MigrateError, match=r"^the snapshot failed: \[Errno 28\] No space left on device: .*manifest"):
        job._run(None)
