"""NBD URIs (the subset libnbd's nbd_connect_uri understands that nbd-postcopy needs).

    nbd://HOST[:PORT]/EXPORT                 TCP, port 10809 by default
    nbd+unix:///EXPORT?socket=PATH           Unix socket
    nbds://... and nbds+unix://...           the same with TLS (NBD STARTTLS)

TLS query parameters: `tls-certificates=DIR` (libnbd's layout: DIR/ca-cert.pem, and for a client
certificate DIR/client-cert.pem and DIR/client-key.pem), or explicit files `tls-ca-file=F`,
`tls-cert-file=F`, `tls-key-file=F`; `tls-verify-peer=false` skips checking the server certificate.
Over TCP the server certificate must also match HOST; over a Unix socket only its chain is checked.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_PORT = 10809
_SCHEMES = {"nbd": (False, False), "nbds": (True, False), "nbd+unix": (False, True), "nbds+unix": (True, True)}
_TLS_KEYS = {"tls-certificates", "tls-ca-file", "tls-cert-file", "tls-key-file", "tls-verify-peer"}


@dataclass(frozen=True)
class NbdAddress:
    uri: str
    export: str
    socket_path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify_peer: bool = True

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context for this address (only meaningful when `tls`)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if not self.tls_verify_peer:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context.check_hostname = self.host is not None
            if self.tls_ca_file:
                context.load_verify_locations(self.tls_ca_file)
            else:
                context.load_default_certs()
        if self.tls_cert_file:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return context


def parse_nbd_uri(uri: str) -> NbdAddress:
    """Parse an NBD URI; ValueError says precisely what is wrong."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"{uri!r}: scheme must be one of nbd://, nbds://, nbd+unix://, nbds+unix://")
    tls, unix = _SCHEMES[scheme]
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if len(export.encode()) > 4096:
        raise ValueError(f"{uri!r}: export name longer than 4096 bytes")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    for key, values in query.items():
        if len(values) != 1:
            raise ValueError(f"{uri!r}: query parameter {key!r} given more than once")
    params = {k: v[0] for k, v in query.items()}
    allowed = (_TLS_KEYS if tls else set()) | ({"socket"} if unix else set())
    unknown = set(params) - allowed
    if unknown:
        hint = " (TLS parameters need nbds:// or nbds+unix://)" if unknown & _TLS_KEYS else ""
        raise ValueError(f"{uri!r}: unsupported query parameter(s) {', '.join(sorted(unknown))}{hint}")
    fields: dict = dict(uri=uri, export=export, tls=tls)
    if unix:
        if parts.netloc:
            raise ValueError(f"{uri!r}: a Unix socket URI has no host: write {scheme}:///EXPORT?socket=PATH")
        if not params.get("socket"):
            raise ValueError(f"{uri!r}: missing ?socket=PATH")
        fields["socket_path"] = params["socket"]
    else:
        if not parts.hostname:
            raise ValueError(f"{uri!r}: missing host: write {scheme}://HOST[:PORT]/EXPORT")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{uri!r}: bad port") from None
        fields.update(host=parts.hostname, port=port or DEFAULT_PORT)
    if tls:
        fields.update(_tls_files(uri, params))
    return NbdAddress(**fields)


def _tls_files(uri: str, params: dict[str, str]) -> dict:
    out: dict = {}
    verify = params.get("tls-verify-peer", "true").lower()
    if verify not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{uri!r}: tls-verify-peer must be true or false")
    out["tls_verify_peer"] = verify in ("true", "1", "yes")
    directory = params.get("tls-certificates")
    if directory:
        d = Path(directory)
        if not d.is_dir():
            raise ValueError(f"{uri!r}: tls-certificates={directory} is not a directory")
        for name, key in (("ca-cert.pem", "tls_ca_file"), ("client-cert.pem", "tls_cert_file"),
                          ("client-key.pem", "tls_key_file")):
            if (d / name).is_file():
                out[key] = str(d / name)
    for param, key in (("tls-ca-file", "tls_ca_file"), ("tls-cert-file", "tls_cert_file"),
                       ("tls-key-file", "tls_key_file")):
        if params.get(param):
            if not Path(params[param]).is_file():
                raise ValueError(f"{uri!r}: {param}={params[param]} is not a file")
            out[key] = params[param]
    if ("tls_cert_file" in out) != ("tls_key_file" in out):
        raise ValueError(f"{uri!r}: a client certificate needs both its certificate and its key")
    return out
