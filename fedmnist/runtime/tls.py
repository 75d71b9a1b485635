"""Mutual TLS between training runs and workers on other machines (`python -m fedmnist.worker --tls`).

Both ends hold a key pair signed by one certificate authority (CA) made for them, and each accepts
only a peer whose certificate that CA signed: the worker refuses a client without one before it
reads a request, and the run refuses a worker whose certificate does not name the address it dials.
docs/security.md has the commands that make the files.

A worker names its files on the command line (`--ca`, `--cert`, `--key`); a training run finds its
own in the environment (`FEDMNIST_TLS_CA`, `FEDMNIST_TLS_CERT`, `FEDMNIST_TLS_KEY`) and uses them for
every worker in `workers:`. The files are checked before TensorFlow starts, so a mistake is one line.
This module needs no TensorFlow.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedmnist.errors import TlsError

ENVIRONMENT = {"ca": "FEDMNIST_TLS_CA", "cert": "FEDMNIST_TLS_CERT", "key": "FEDMNIST_TLS_KEY"}


@dataclass(frozen=True)
class TlsFiles:
    """The CA certificate(s) to trust, this end's certificate, and its private key (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    def load(self) -> Credentials:
        """The files' contents, checked: the key readable by its owner only and matching the certificate,
        the certificate signed by the CA and valid now. Raises TlsError."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        ca_pem, cert_pem, key_pem = (_read(path, what) for path, what in
                                     ((self.ca, "CA certificate"), (self.cert, "certificate"), (self.key, "private key")))
        mode = self.key.stat().st_mode & 0o777
        if mode & 0o077:
            raise TlsError(f"the private key {self.key} can be read by other users (mode {mode:o}); "
                           f"chmod 600 {self.key}")
        try:
            authorities = x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            raise TlsError(f"{self.ca} is not a PEM certificate") from None
        try:
            certificate = x509.load_pem_x509_certificates(cert_pem)[0]
        except ValueError:
            raise TlsError(f"{self.cert} is not a PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise TlsError(f"{self.key} is not an unencrypted PEM private key") from None
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
            raise TlsError(f"the private key {self.key} does not belong to the certificate {self.cert}")
        if not any(_issued_by(certificate, authority) for authority in authorities):
            raise TlsError(f"the certificate {self.cert} is not signed by the CA in {self.ca}")
        now = datetime.datetime.now(datetime.timezone.utc)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise TlsError(f"the certificate {self.cert} is not valid now (valid from "
                           f"{certificate.not_valid_before_utc:%Y-%m-%d} to {certificate.not_valid_after_utc:%Y-%m-%d})")
        return Credentials(self, ca_pem, cert_pem, key_pem)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TlsError(f"the {what} {path} cannot be read: {error.strerror}") from None


def _issued_by(certificate, authority) -> bool:
    try:
        certificate.verify_directly_issued_by(authority)
        return True
    except Exception:  # noqa: BLE001 - InvalidSignature, and key types it cannot check
        return False


@dataclass(frozen=True)
class Credentials:
    """Loaded, checked TLS files: gRPC credentials for a worker (server) or a run (client)."""

    files: TlsFiles
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def server(self):
        """A worker's: it requires a client certificate signed by the CA."""
        import grpc

        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def channel(self):
        """A run's: it presents its certificate and accepts a worker whose certificate the CA signed for
        the address it dials."""
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)

    def handshake_problem(self, host: str, port: int, timeout: float = 5.0) -> str | None:
        """Why a TLS handshake with the worker at host:port fails, as one phrase; None when it succeeds or
        the worker cannot be reached at all (then the caller's own message says so)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=self.ca_pem.decode("ascii", "replace"))
        context.load_cert_chain(certfile=str(self.files.cert), keyfile=str(self.files.key))
        context.set_alpn_protocols(["h2"])
        try:
            with socket.create_connection((host, port), timeout=timeout) as raw:
                with context.wrap_socket(raw, server_hostname=host) as connection:
                    connection.do_handshake()
        except ssl.SSLCertVerificationError as error:
            return f"its certificate is not accepted ({error.verify_message})"
        except ssl.SSLError as error:
            return f"the TLS handshake failed ({error.reason or error})"
        except OSError:
            return None
        return None


def from_environment(environ: Mapping[str, str] | None = None) -> TlsFiles | None:
    """The run's TLS files named by FEDMNIST_TLS_CA, _CERT and _KEY; None when none is set. Raises
    TlsError when only some are."""
    environ = os.environ if environ is None else environ
    values = {name: environ.get(variable, "") for name, variable in ENVIRONMENT.items()}
    if not any(values.values()):
        return None
    missing = [ENVIRONMENT[name] for name, value in values.items() if not value]
    if missing:
        raise TlsError(f"{', '.join(missing)} not set: a run's TLS needs all of "
                       f"{', '.join(ENVIRONMENT.values())}")
    return TlsFiles(*(Path(values[name]) for name in ("ca", "cert", "key")))
