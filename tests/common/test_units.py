"""The one parser each for sizes, addresses and listen addresses (nbd_postcopy.common.units)."""

import argparse

import pytest

from nbd_postcopy.common.command import option_type
from nbd_postcopy.common.metrics import parse_metrics_listen
from nbd_postcopy.common.units import ListenAddress, parse_address, parse_listen, parse_size


@pytest.mark.parametrize("text, value", [
    ("4096", 4096), ("0x1000", 4096), ("0X1000", 4096), (" 4096 ", 4096), ("0", 0),
    ("4k", 4096), ("4K", 4096), ("4KiB", 4096), ("4kib", 4096), ("4KB", 4096), ("4096B", 4096),
    ("256M", 256 << 20), ("256MiB", 256 << 20), ("1g", 1 << 30), ("1Gi", 1 << 30), ("2T", 2 << 40),
    ("0x10M", 16 << 20), ("0x1b", 0x1B),  # B after hex digits is a digit, as int() reads it
])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12 apples", "-1", "1.5G", "4X", "M", "0x", "4 K", "1KK"])
def test_bad_sizes_are_one_line_errors(text):
    with pytest.raises(ValueError, match="not a size") as error:
        parse_size(text)
    assert "\n" not in str(error.value)


def test_addresses():
    assert parse_address("0x7f0000000000") == 0x7F0000000000
    assert parse_address("4096") == 4096 and parse_address("0") == 0
    for bad in ("-1", "zz", "0x", "1.0", "", "0o17"):
        with pytest.raises(ValueError, match="address must be a number"):
            parse_address(bad)


@pytest.mark.parametrize("spec, address", [
    ("unix:/run/x.sock", ListenAddress("unix", path="/run/x.sock")),
    ("tcp:0.0.0.0:10809", ListenAddress("tcp", host="0.0.0.0", port=10809)),
    ("tcp:[::1]:10809", ListenAddress("tcp", host="::1", port=10809)),
    ("127.0.0.1:9101", ListenAddress("tcp", host="127.0.0.1", port=9101)),
    ("localhost:0", ListenAddress("tcp", host="localhost", port=0)),
    (":9101", ListenAddress("tcp", host="127.0.0.1", port=9101)),
    ("[::1]:9101", ListenAddress("tcp", host="::1", port=9101)),
    ("tcp:h:65535", ListenAddress("tcp", host="h", port=65535)),
])
def test_listen_addresses(spec, address):
    assert parse_listen(spec) == address


def test_listen_address_strings():
    assert str(parse_listen("unix:/run/x.sock")) == "unix:/run/x.sock"
    assert str(parse_listen(":9101")) == "tcp:127.0.0.1:9101"
    assert str(parse_listen("tcp:[::1]:80")) == "tcp:[::1]:80"


@pytest.mark.parametrize("spec, message", [
    ("udp:1.2.3.4:5", "not a listen address"), ("tcp:localhost", "not a listen address"),
    ("tcp::80", "not a listen address"), ("unix:", "not a listen address"), ("/path", "not a listen address"),
    ("::1:80", "not a listen address"), ("[::1:80", "not a listen address"), ("host:http", "not a listen address"),
    ("tcp:h:99999", "port 99999 out of range 0..65535"), ("127.0.0.1:70000", "port 70000 out of range"),
])
def test_bad_listen_addresses_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_listen(spec)
    assert "\n" not in str(error.value)


def test_each_caller_restricts_the_kinds():
    assert parse_metrics_listen("127.0.0.1:9101") == ListenAddress("tcp", host="127.0.0.1", port=9101)
    for spec in ("unix:/run/metrics.sock", "127.0.0.1:70000"):
        with pytest.raises(ValueError):
            parse_metrics_listen(spec)
    with pytest.raises(ValueError, match="use unix:PATH"):
        parse_listen("127.0.0.1:80", kinds=("unix",))


def test_option_type_makes_usage_errors():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=option_type(parse_size))
    assert parser.parse_args(["--length", "1G"]).length == 1 << 30
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        option_type(parse_size)("lots")
