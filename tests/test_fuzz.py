"""The fuzz targets (fuzz/targets.py): the committed corpus passes every invariant, and a short
coverage-guided run of each target finds nothing. Long runs: `python -m fuzz.run all --seconds 900`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fuzz import run
from fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus_passes(target):
    seeds = sorted((CORPUS / target).iterdir())
    assert seeds, f"no seeds in {CORPUS / target}"
    for seed in seeds:
        TARGETS[target](seed.read_bytes())  # a Finding or any non-ProtocolError exception fails


def test_targets_find_planted_faults(monkeypatch):
    """The invariant checks bite: a server core that answers a handle it never received is caught."""
    from nbd_postcopy.nbd import server_core

    real = server_core.ServerConnection._reject

    def wrong_handle(self, handle, error, message):
        real(self, handle ^ 0x5A5A, error, message)

    monkeypatch.setattr(server_core.ServerConnection, "_reject", wrong_handle)
    with pytest.raises(AssertionError, match="no unanswered request carries"):
        for seed in sorted((CORPUS / "nbd_server").iterdir()):
            TARGETS["nbd_server"](seed.read_bytes())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (scripts/install.sh installs it with pip)")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_short_fuzz_run(target, tmp_path, monkeypatch):
    monkeypatch.setattr(run, "CRASHES", tmp_path / "crashes")
    result = run.fuzz(target, seconds=10, runs=None, work=tmp_path)
    print(f"{target}: {result['executions']} executions, {result['coverage']} coverage edges", file=sys.stderr)
    assert result["status"] == 0 and not result["crashes"], result["tail"]
    assert result["executions"] > 100 and result["coverage"] > 5
