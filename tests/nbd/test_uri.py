"""NBD URI parsing."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from nbd_postcopy.nbd.uri import NbdAddress, parse_nbd_uri


@pytest.mark.parametrize("uri, expected", [
    ("nbd://example.com/ram", dict(host="example.com", port=10809, export="ram", tls=False)),
    ("nbd://127.0.0.1:2000/", dict(host="127.0.0.1", port=2000, export="", tls=False)),
    ("nbd://[::1]:2000", dict(host="::1", port=2000, export="", tls=False)),
    ("nbd+unix:///ram?socket=/run/s.sock", dict(socket_path="/run/s.sock", export="ram", host=None)),
    ("nbd+unix:///?socket=/tmp/a%20b", dict(socket_path="/tmp/a b", export="")),
    ("nbd://h/a%2Fb", dict(export="a/b")),
    ("nbds://h:1/x", dict(host="h", port=1, tls=True, tls_verify_peer=True)),
    ("nbds+unix:///x?socket=/s&tls-verify-peer=false", dict(tls=True, tls_verify_peer=False)),
])
def test_good_uris(uri, expected):
    address = parse_nbd_uri(uri)
    assert isinstance(address, NbdAddress) and address.uri == uri
    for key, value in expected.items():
        assert getattr(address, key) == value, key


@pytest.mark.parametrize("uri, message", [
    ("http://h/x", "scheme must be one of"),
    ("/run/s.sock", "scheme must be one of"),
    ("nbd:///x", "missing host"),
    ("nbd://h:port/x", "bad port"),
    ("nbd+unix:///x", "missing \\?socket=PATH"),
    ("nbd+unix://host/x?socket=/s", "has no host"),
    ("nbd://h/x?socket=/s", "unsupported query parameter\\(s\\) socket"),
    ("nbd://h/x?tls-certificates=/tmp", "TLS parameters need nbds"),
    ("nbd+unix:///x?socket=/a&socket=/b", "more than once"),
    ("nbds://h/x?tls-certificates=/nonexistent", "is not a directory"),
    ("nbds://h/x?tls-ca-file=/nonexistent", "is not a file"),
    ("nbds://h/x?tls-verify-peer=maybe", "true or false"),
    ("nbd://h/" + "x" * 5000, "longer than 4096"),
])
def test_bad_uris(uri, message):
    with pytest.raises(ValueError, match=message):
        parse_nbd_uri(uri)


def test_tls_certificates_directory_in_libnbd_layout(tmp_path: Path):
    for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        (tmp_path / name).write_text("x")
    address = parse_nbd_uri(f"nbds+unix:///ram?socket=/s&tls-certificates={tmp_path}")
    assert address.tls_ca_file == str(tmp_path / "ca-cert.pem")
    assert (address.tls_cert_file, address.tls_key_file) == (str(tmp_path / "client-cert.pem"),
                                                             str(tmp_path / "client-key.pem"))
    (tmp_path / "client-key.pem").unlink()
    with pytest.raises(ValueError, match="both its certificate and its key"):
        parse_nbd_uri(f"nbds+unix:///ram?socket=/s&tls-certificates={tmp_path}")


def test_ssl_context_checks_hostnames_over_tcp_only():
    assert parse_nbd_uri("nbds://localhost/x").ssl_context().check_hostname
    unix = parse_nbd_uri("nbds+unix:///x?socket=/s").ssl_context()
    assert not unix.check_hostname and unix.verify_mode == ssl.CERT_REQUIRED
    assert parse_nbd_uri("nbds://h/x?tls-verify-peer=0").ssl_context().verify_mode == ssl.CERT_NONE
