"""Certificates for every TLS role, from trustme (tests of the TLS
listener and upstreams, and clients that speak TLS to the proxy)."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import trustme


class Certificates:
    """Files for every role, issued by three CAs: `ca` signs the proxy's and
    the broker's certificates, `client_ca` signs client certificates (for the
    listener and for the broker), `rogue_ca` is trusted by nobody."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.client_ca = trustme.CA()
        self.rogue_ca = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.client_ca_file = self._write("client-ca.pem", self.client_ca.cert_pem.bytes())
        self.proxy = self.ca.issue_cert("localhost", "127.0.0.1")
        self.proxy_cert, self.proxy_key = self._pair("proxy", self.proxy)
        self.broker = self.ca.issue_cert("localhost", "127.0.0.1")
        self.client = self.client_ca.issue_cert("client.example")
        self.client_cert, self.client_key = self._pair("client", self.client)
        self.rogue_client = self.rogue_ca.issue_cert("client.example")
        self.rogue_broker = self.rogue_ca.issue_cert("localhost", "127.0.0.1")
        # Trusted CA, but for another host than the one amqplex dials.
        self.elsewhere_broker = self.ca.issue_cert("broker.example")
        self.expired = self.ca.issue_cert(
            "localhost",
            not_before=datetime.datetime(2020, 1, 1),
            not_after=datetime.datetime(2021, 1, 1),
        )
        self.expired_cert, self.expired_key = self._pair("expired", self.expired)
        in_a_year = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365)
        self.future = self.ca.issue_cert(
            "localhost", not_before=in_a_year, not_after=in_a_year + datetime.timedelta(days=1)
        )
        self.future_cert, self.future_key = self._pair("future", self.future)

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)

    def _pair(self, name: str, issued: trustme.LeafCert) -> tuple[str, str]:
        cert = b"".join(blob.bytes() for blob in issued.cert_chain_pems)
        return (
            self._write(f"{name}-cert.pem", cert),
            self._write(f"{name}-key.pem", issued.private_key_pem.bytes()),
        )

    def client_context(self, identity: trustme.LeafCert | None = None) -> ssl.SSLContext:
        """What a client of the proxy uses: trusts `ca`, may present `identity`."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if identity is not None:
            identity.configure_cert(context)
        return context


def listener_env(certs: Certificates, **extra: str) -> dict[str, str]:
    return {"AMQP_TLS_CERT": certs.proxy_cert, "AMQP_TLS_KEY": certs.proxy_key, **extra}
