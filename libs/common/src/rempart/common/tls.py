"""Server TLS (SPEC R-TLS-3): minimum version, cipher presets, server cipher order, one
certificate per host name (SNI), and hot reload when the files on disk change.

Listeners are created once with the context of :meth:`ServerTls.context`; its SNI callback
swaps in the newest context for each handshake, so a renewed certificate (a Kubernetes Secret
update) is served without restart.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from rempart.common.config import TlsSettings
    from rempart.common.settings import EdgeSettings

log = logging.getLogger(__name__)

CIPHER_PRESETS = {
    # Forward-secret AEAD suites only: stricter than the guide.
    "strict": "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL",
    # The guide's list, for old clients.
    "compat": "ECDH+AESGCM:DH+AESGCM:ECDH+AES256:DH+AES256:ECDH+AES128:DH+AES:RSA+AESGCM:RSA+AES:!aNULL:!MD5:!DSS",
}
MIN_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class CertPair:
    cert_file: str
    key_file: str

    def mtimes(self) -> tuple[float, float]:
        return (os.stat(self.cert_file).st_mtime, os.stat(self.key_file).st_mtime)


def build_context(
    pair: CertPair, min_version: str = "TLSv1.2", cipher_preset: str = "strict", honor_server_order: bool = True
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSIONS[min_version]
    ctx.set_ciphers(CIPHER_PRESETS[cipher_preset])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options |= ssl.OP_SINGLE_ECDH_USE | ssl.OP_SINGLE_DH_USE
    if honor_server_order:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(pair.cert_file, pair.key_file)
    return ctx


class ServerTls:
    """The current server contexts, per host name, reloaded when their files change."""

    def __init__(
        self,
        default: CertPair,
        by_hostname: dict[str, CertPair] | None = None,
        min_version: str = "TLSv1.2",
        cipher_preset: str = "strict",
        honor_server_order: bool = True,
    ) -> None:
        self._default = default
        self._by_hostname = {k.lower(): v for k, v in (by_hostname or {}).items()}
        self._params = (min_version, cipher_preset, honor_server_order)
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._mtimes: dict[str, tuple[float, float]] = {}
        self._outer: ssl.SSLContext | None = None
        self.reload(force=True)

    @classmethod
    def for_edge(cls, settings: EdgeSettings, tls: TlsSettings) -> ServerTls:
        """The listeners' TLS of an edge (smtp-edge, imap-pop): the default certificate, one per
        host name from REMPART_TLS_SNI_DIR (R-TLS-3), and the server's TLS settings."""
        return cls(
            CertPair(settings.tls_cert_file, settings.tls_key_file),
            by_hostname={name: CertPair(*pair) for name, pair in settings.sni_certificates().items()},
            min_version=tls.min_version, cipher_preset=tls.cipher_preset, honor_server_order=tls.honor_server_order,
        )

    def _pairs(self) -> dict[str, CertPair]:
        return {"": self._default, **self._by_hostname}

    def reload(self, force: bool = False) -> bool:
        """Rebuild the contexts whose files changed; a broken new file keeps the old context."""
        changed = False
        for name, pair in self._pairs().items():
            try:
                mtimes = pair.mtimes()
                if not force and self._mtimes.get(name) == mtimes:
                    continue
                self._contexts[name] = build_context(pair, *self._params)
                self._mtimes[name] = mtimes
                changed = True
            except (OSError, ssl.SSLError) as exc:
                if force and name == "":
                    raise
                log.error("certificate reload failed, keeping the previous one: %s", exc,
                          extra={"cert_file": pair.cert_file})
        if changed and not force:
            log.info("certificates reloaded")
        return changed

    def set_policy(self, min_version: str, cipher_preset: str, honor_server_order: bool) -> None:
        if (min_version, cipher_preset, honor_server_order) != self._params:
            self._params = (min_version, cipher_preset, honor_server_order)
            self.reload(force=True)

    def current(self, hostname: str = "") -> ssl.SSLContext:
        return self._contexts.get(hostname.lower(), self._contexts[""])

    def context(self) -> ssl.SSLContext:
        """The context to hand to a listener: it delegates each handshake to the newest one."""
        if self._outer is None:
            outer = build_context(self._default, *self._params)

            def pick(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
                sslobj.context = self.current(server_name or "")

            outer.sni_callback = pick  # type: ignore[assignment]
            self._outer = outer
        return self._outer


def write_self_signed(directory: Path, hostnames: list[str], days: int = 825) -> CertPair:
    """A self-signed certificate for development and tests (SAN: each name, IPs as IPs)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )
    os.chmod(key_file, 0o600)
    return CertPair(str(cert_file), str(key_file))
