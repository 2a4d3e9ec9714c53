"""TLS on both sides of the proxy.

Client side: with tls.cert and tls.key set the listener speaks TLS, and with
tls.verify_client optional or required it asks clients for a certificate
signed by tls.client_ca_cert (a CA of its own, never the one that verifies
the broker). Upstream side: an amqps:// upstream.url makes every connection
to the broker TLS, verified against the OS trust store or tls.ca_cert, with
SNI and a host-name check; tls.client_cert and tls.client_key are presented
to a broker that asks for them; tls.skip_verify turns verification off.

Each certificate and key setting holds a PEM file path or the PEM itself
base64-encoded, so the environment can carry it
(AMQP_TLS_CERT="$(base64 -w0 cert.pem)"), or the PEM text as it is (a YAML
block). build() checks everything when the
configuration is loaded, at start and on HUP: a missing file, a key that
cannot be read or does not match its certificate, an expired certificate are
each refused with a SettingError whose message starts with the setting.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import datetime
import logging
import os
import re
import ssl
import tempfile
import typing
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import serialization

if typing.TYPE_CHECKING:
    from amqplex.config.settings import Config, TLSConfig, UpstreamConfig

log = logging.getLogger(__name__)

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
# "[SSL: CERTIFICATE_VERIFY_FAILED] ... (_ssl.c:1006)": the words in between.
_BASE64 = re.compile(r"[A-Za-z0-9+/=]*")
_SSL_NOISE = re.compile(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$")
_VERIFY_MODES = {"optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
# Settings that only mean something for an amqps:// upstream.
_UPSTREAM_KEYS = ("ca_cert", "client_cert", "client_key", "skip_verify")


class SettingError(ValueError):
    """A TLS setting that cannot be used; the message starts with its key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key


class HandshakeFailed(ConnectionError):
    """The TLS handshake with the broker failed: its certificate did not
    verify, it asked for a client certificate we do not have, it does not
    speak TLS on that port... An OSError, so it is handled as any other
    unreachable broker (320 to the clients waiting, redial with backoff)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Contexts:
    """The SSL contexts of one configuration; None where that side is plain TCP."""

    listener: ssl.SSLContext | None = None
    upstream: ssl.SSLContext | None = None
    # Bound on a client's TLS handshake (client.handshake_timeout).
    handshake_timeout: float = 10.0

    def listener_args(self) -> dict[str, typing.Any]:
        """Keyword arguments for loop.create_server()."""
        if self.listener is None:
            return {}
        return {"ssl": self.listener, "ssl_handshake_timeout": self.handshake_timeout}


def build(config: Config) -> Contexts:
    """The contexts `config` asks for, every setting checked (SettingError)."""
    settings = config.tls
    amqps = is_amqps(config.upstream.url)
    if not amqps:
        for name in _UPSTREAM_KEYS:
            if getattr(settings, name):
                raise SettingError(
                    f"tls.{name}",
                    f"only used for an amqps:// upstream, but upstream.url is "
                    f"{_scheme(config.upstream.url)}://",
                )
    return Contexts(
        listener=_listener_context(settings),
        upstream=_upstream_context(settings) if amqps else None,
        handshake_timeout=config.client.handshake_timeout,
    )


def warnings_for(config: Config) -> list[str]:
    """What an operator must be told at start about the TLS settings."""
    if is_amqps(config.upstream.url) and config.tls.skip_verify:
        said = [
            "tls.skip_verify is on: the broker's certificate is NOT verified, so anyone "
            "between amqplex and the broker can read and change the traffic, passwords included"
        ]
        if config.tls.ca_cert:
            said.append("tls.ca_cert is ignored while tls.skip_verify is on")
        return said
    return []


def summary(config: Config) -> str:
    """What TLS is in use, in one line for the log at start."""
    settings = config.tls
    sides = []
    if settings.cert:
        sides.append(f"client listener speaks TLS (client certificates: {settings.verify_client})")
    if is_amqps(config.upstream.url):
        if settings.skip_verify:
            verified = "not verified (tls.skip_verify)"
        else:
            verified = (
                f"verified against {'tls.ca_cert' if settings.ca_cert else 'the OS trust store'}"
            )
        mtls = ", presenting tls.client_cert" if settings.client_cert else ""
        sides.append(f"upstream is amqps, {verified}{mtls}")
    return "TLS: " + ("; ".join(sides) if sides else "off")


def log_at_start(config: Config) -> None:
    """The summary, and the warnings an operator must not miss (at start and
    on each reload)."""
    log.info("%s", summary(config))
    for warning in warnings_for(config):
        log.warning("%s", warning)


def is_amqps(url: str) -> bool:
    return _scheme(url) == "amqps"


def _scheme(url: str) -> str:
    return urllib.parse.urlsplit(url).scheme


# -- the process's contexts ------------------------------------------------------
#
# A worker serves one configuration; its upstream connections are dialled
# from deep inside the pools, which see only upstream.*, so the worker
# installs its contexts here once and the dialling code finds them.

_installed: Contexts | None = None


def install(config: Config) -> Contexts:
    global _installed
    _installed = build(config)
    return _installed


def _upstream_ssl() -> ssl.SSLContext:
    # A worker installs its configuration's contexts before it dials; a
    # context made up here would ignore tls.ca_cert, the client
    # certificate and tls.skip_verify.
    if _installed is None or _installed.upstream is None:
        raise RuntimeError("an amqps:// dial before tls.install() of its configuration")
    return _installed.upstream


def dial_args(upstream: UpstreamConfig) -> dict[str, typing.Any]:
    """Keyword arguments that make a connection to the broker TLS for an
    amqps:// URL (SNI and the host-name check use the URL's host)."""
    if not is_amqps(upstream.url):
        return {}
    return {
        "ssl": _upstream_ssl(),
        "server_hostname": upstream.host,
        "ssl_handshake_timeout": upstream.connect_timeout,
    }


async def create_connection(
    loop: asyncio.AbstractEventLoop,
    factory: typing.Callable[[], asyncio.Protocol],
    upstream: UpstreamConfig,
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """loop.create_connection() to the broker, TLS for amqps://; a failed
    TLS handshake raises HandshakeFailed saying why."""
    with naming_tls_failures(upstream):
        return await loop.create_connection(
            factory, upstream.host, upstream.port, **dial_args(upstream)
        )


async def open_connection(
    upstream: UpstreamConfig,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio.open_connection() to the broker, as create_connection()."""
    with naming_tls_failures(upstream):
        return await asyncio.open_connection(upstream.host, upstream.port, **dial_args(upstream))


@contextlib.contextmanager
def naming_tls_failures(upstream: UpstreamConfig) -> typing.Iterator[None]:
    try:
        yield
    except ssl.SSLError as error:
        raise HandshakeFailed(
            f"TLS handshake with the broker at {upstream.host}:{upstream.port} failed: "
            f"{describe_ssl_error(error)}"
        ) from error
    except ConnectionResetError as error:
        if not is_amqps(upstream.url):
            raise
        # Connected, then cut before the handshake ended: what a TLS server
        # does when it will not have us (no client certificate, say).
        raise HandshakeFailed(
            f"TLS handshake with the broker at {upstream.host}:{upstream.port} failed: "
            "the broker reset the connection"
        ) from error


def describe_error(error: BaseException) -> str:
    """Why a connection was lost, saying so when TLS is the reason (a broker
    that wanted a client certificate says it only after the handshake)."""
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {describe_ssl_error(error)}"
    return str(error)


def describe_ssl_error(error: ssl.SSLError) -> str:
    """'certificate verify failed: self-signed certificate in certificate chain',
    without OpenSSL's library tag and source line."""
    text = error.args[1] if len(error.args) > 1 and isinstance(error.args[1], str) else str(error)
    return _SSL_NOISE.sub("", text).strip() or type(error).__name__


# -- the listener (clients -> proxy) ---------------------------------------------


def _listener_context(settings: TLSConfig) -> ssl.SSLContext | None:
    verify = settings.verify_client
    if not (settings.cert or settings.key):
        for key, value in (
            ("tls.client_ca_cert", settings.client_ca_cert),
            ("tls.verify_client", verify != "none"),
        ):
            if value:
                raise SettingError(
                    key, "the client listener is not TLS: set tls.cert and tls.key first"
                )
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(context, "tls.cert", "tls.key", settings.cert, settings.key)
    if verify != "none" and not settings.client_ca_cert:
        raise SettingError(
            "tls.verify_client",
            f"{verify!r} needs tls.client_ca_cert, the CA that signs client certificates",
        )
    if settings.client_ca_cert and verify == "none":
        raise SettingError(
            "tls.verify_client",
            "is none, so tls.client_ca_cert would not be used: set optional or required",
        )
    if settings.client_ca_cert:
        _load_ca(context, "tls.client_ca_cert", settings.client_ca_cert)
        context.verify_mode = _VERIFY_MODES[verify]
    return context


# -- upstream (proxy -> broker) ------------------------------------------------------


def _upstream_context(settings: TLSConfig) -> ssl.SSLContext:
    if settings.ca_cert:
        # Only the configured CA: not the OS trust store as well.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_ca(context, "tls.ca_cert", settings.ca_cert)
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.client_cert or settings.client_key:
        _load_identity(
            context,
            "tls.client_cert",
            "tls.client_key",
            settings.client_cert,
            settings.client_key,
        )
    if settings.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# -- certificates and keys ------------------------------------------------------------


def _load_identity(
    context: ssl.SSLContext, cert_key: str, key_key: str, cert_value: str, key_value: str
) -> None:
    """A certificate (chain) and its private key into `context`; the key may
    be in the certificate's own PEM when `key_value` is empty."""
    if not cert_value:
        read_pem(key_key, key_value)  # a missing file is the first thing to hear of
        raise SettingError(key_key, f"is set but {cert_key}, its certificate, is not")
    cert_pem = read_pem(cert_key, cert_value)
    chain = _blocks(cert_pem, "CERTIFICATE")
    if not chain:
        raise SettingError(cert_key, "holds no PEM certificate")
    certificates = _parse_certificates(cert_key, chain)
    now = datetime.datetime.now(datetime.UTC)
    for certificate in certificates:
        if certificate.not_valid_after_utc < now:
            raise SettingError(cert_key, _expired(certificate))
        if certificate.not_valid_before_utc > now:
            # Clients refuse it as they refuse an expired one: say so now.
            when = certificate.not_valid_before_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
            raise SettingError(
                cert_key, f"the certificate for {_name(certificate)} is not valid before {when}"
            )
    if key_value:
        key_pem, key_source = read_pem(key_key, key_value), key_key
    else:
        key_pem, key_source = cert_pem, cert_key
    keys = _blocks(key_pem, "PRIVATE KEY")
    if not keys:
        if not key_value:
            raise SettingError(key_key, f"required when {cert_key} is set")
        raise SettingError(key_key, "holds no PEM private key")
    try:
        serialization.load_pem_private_key(keys[0], password=None)
    except TypeError:
        raise SettingError(
            key_source, "the private key is encrypted: give it unencrypted (no passphrase)"
        ) from None
    except ValueError as error:
        # cryptography explains at length; its first sentence is the news.
        reason = str(error).split(". ")[0]
        raise SettingError(key_source, f"cannot read the private key: {reason}") from None
    with _memory_file(b"".join(chain)) as cert_path, _memory_file(keys[0]) as key_path:
        try:
            context.load_cert_chain(cert_path, key_path, password=_no_passphrase)
        except ssl.SSLError as error:
            if error.reason == "KEY_VALUES_MISMATCH":
                reason = f"does not match the certificate in {cert_key}"
                raise SettingError(key_key, reason) from None
            raise SettingError(key_key, f"not usable: {describe_ssl_error(error)}") from None


def _load_ca(context: ssl.SSLContext, key: str, value: str) -> None:
    chain = _blocks(read_pem(key, value), "CERTIFICATE")
    if not chain:
        raise SettingError(key, "holds no PEM certificate")
    certificates = _parse_certificates(key, chain)
    now = datetime.datetime.now(datetime.UTC)
    # A bundle may well hold an old CA beside current ones; one that holds
    # nothing but expired certificates can verify nobody.
    if all(certificate.not_valid_after_utc < now for certificate in certificates):
        raise SettingError(key, _expired(certificates[0]))
    try:
        context.load_verify_locations(cadata=b"".join(chain).decode("ascii"))
    except (ssl.SSLError, ValueError) as error:
        raise SettingError(key, f"not a usable CA certificate: {error}") from None


def _parse_certificates(key: str, blocks: list[bytes]) -> list[x509.Certificate]:
    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as error:
        raise SettingError(key, f"cannot read the certificate: {error}") from None


def _expired(certificate: x509.Certificate) -> str:
    when = certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"the certificate for {_name(certificate)} expired on {when}"


def _name(certificate: x509.Certificate) -> str:
    common = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if common:
        return str(common[0].value)
    with contextlib.suppress(x509.ExtensionNotFound):
        alternatives = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        names = [str(name.value) for name in alternatives]
        if names:
            return names[0]
    return certificate.subject.rfc4514_string() or "(no name)"


def _blocks(pem: bytes, label_ending: str) -> list[bytes]:
    """The PEM blocks whose label ends with `label_ending`, in order."""
    wanted = label_ending.encode()
    return [m.group(0) + b"\n" for m in _PEM_BLOCK.finditer(pem) if m.group(1).endswith(wanted)]


def read_pem(key: str, value: str) -> bytes:
    """The PEM text a setting gives: a file's content, the PEM base64-encoded,
    or (handy in a YAML block) the PEM text itself."""
    if value.lstrip().startswith("-----BEGIN "):
        return value.encode()  # the PEM itself (a YAML block, say)
    if not os.path.exists(value):
        try:
            decoded = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        if b"-----BEGIN " in decoded:
            return decoded
    try:
        with open(value, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise SettingError(
            key, f"no such file: {_shown(key, value)} (nor is it base64-encoded PEM)"
        ) from None
    except OSError as error:
        raise SettingError(key, f"cannot read {_shown(key, value)}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise SettingError(key, f"{_shown(key, value)} holds no PEM data")
    return data


def holds_private_key(value: str) -> bool:
    """Whether a setting's text is, or holds, a private key: PEM text, or
    base64 of PEM (a certificate setting may bundle its key)."""
    if "PRIVATE KEY" in value:
        return True
    try:
        decoded = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        return False
    return b"PRIVATE KEY" in decoded


def _shown(key: str, value: str) -> str:
    """`value` as an error may show it: a path, shortened; never what may be
    key material (base64 that did not decode, PEM text that did not parse),
    of which even a part is a part of the key, whichever setting has it.
    A value with a character base64 has not (a dot, say) is no base64."""
    if _BASE64.fullmatch("".join(value.split())) or "PRIVATE KEY" in value or "\n" in value:
        return f"(a value of {len(value)} characters, not shown)"
    return repr(value if len(value) <= 80 else value[:77] + "...")


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for a passphrase.
    raise SettingError("tls", "encrypted private keys are not supported")


@contextlib.contextmanager
def _memory_file(data: bytes) -> typing.Iterator[str]:
    """A path to `data` for ssl's load_cert_chain(), which reads only files:
    an anonymous in-memory file where the system has them, so key material
    from the environment never touches a disk, else a private temporary file."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("amqplex-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(prefix="amqplex-tls-") as handle:
        handle.write(data)
        handle.flush()
        yield handle.name
