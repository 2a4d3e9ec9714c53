"""TLS on both sides (issue 6): the client listener with optional or required
client certificates, amqps:// upstreams verified against tls.ca_cert with SNI
and host-name checks, a client certificate for a broker that asks for one,
skip_verify, certificates from base64 environment variables, refusal of bad
certificate settings at start and on HUP, and a 320 naming the TLS failure
when the broker's certificate does not verify.

Certificates come from trustme; the TLS "broker" is the tests' own relay
(tests/support/relay.py) terminating TLS on 127.0.0.1 in front of the real
RabbitMQ."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pika
import pytest
import trustme
import yaml

from amqplex import tls
from amqplex.config import Config, ConfigError, load
from amqplex.config.settings import UpstreamConfig
from amqplex.master import status
from amqplex.protocol.constants import PROTOCOL_HEADER
from tests.conftest import proxy_params
from tests.support.certs import listener_env
from tests.support.daemon import free_port
from tests.support.rawclient import RawClient
from tests.support.relay import BOTH, Relay


def b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


# -- a TLS "broker": the relay, terminating TLS ------------------------------------


class TLSRelay(Relay):
    """The tests' relay with a TLS listener: amqplex dials it as an amqps://
    broker; it records the SNI names and client certificates it was given."""

    def __init__(self, identity: trustme.LeafCert, host: str, client_ca=None) -> None:
        super().__init__()
        self.host = host
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        identity.configure_cert(self.context)
        if client_ca is not None:
            client_ca.configure_trust(self.context)
            self.context.verify_mode = ssl.CERT_REQUIRED
            # In TLS 1.2 a refused client certificate fails the handshake
            # itself; in 1.3 the client learns of it only at its first read,
            # and asyncio's server resets rather than sending its alert first.
            self.context.maximum_version = ssl.TLSVersion.TLSv1_2
        self.server_names: list[str | None] = []
        self.context.sni_callback = self._sni
        self.peer_certs: list[dict | None] = []

    @property
    def url(self) -> str:
        return f"amqps://{self.host}:{self.port}"

    def _sni(self, ssl_object, server_name, context) -> None:
        self.server_names.append(server_name)

    async def _listen(self) -> None:
        # Relay._listen, with ssl= on the listener.
        self._flowing = {direction: asyncio.Event() for direction in BOTH}
        for event in self._flowing.values():
            event.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, client_reader, client_writer) -> None:
        self.peer_certs.append(client_writer.get_extra_info("peercert"))
        await super()._accept(client_reader, client_writer)


@pytest.fixture
def tls_relay():
    """tls_relay(identity, host="localhost", client_ca=None) starts a TLSRelay."""
    relays: list[TLSRelay] = []

    def start(identity, host: str = "localhost", client_ca=None) -> TLSRelay:
        relay = TLSRelay(identity, host, client_ca).start()
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        relay.stop()


# -- what the tests do through the proxy ----------------------------------------------


def tls_params(port: int, context: ssl.SSLContext, **kwargs) -> pika.ConnectionParameters:
    return proxy_params(
        port, ssl_options=pika.SSLOptions(context, server_hostname="localhost"), **kwargs
    )


def round_trip(params: pika.ConnectionParameters) -> None:
    """Connect, publish with a confirm, read the message back, leave."""
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        queue = channel.queue_declare("", exclusive=True).method.queue
        body = uuid.uuid4().bytes
        channel.basic_publish("", queue, body)
        method, _, got = channel.basic_get(queue, auto_ack=True)
        assert method is not None and got == body
    finally:
        connection.close()


def refused_at_login(port: int) -> tuple[object, float]:
    """A raw client's handshake through the proxy: the Close it gets at
    StartOk, and how long that took."""
    started = time.monotonic()
    with RawClient(port) as client:
        got = client.handshake()
    assert got is not None, "socket closed without Connection.Close"
    return got[1], time.monotonic() - started


# -- the client listener ---------------------------------------------------------------


def test_tls_listener_serves_pika_with_ssl_options(fresh_amqplexd, certs):
    daemon = fresh_amqplexd(env=listener_env(certs))
    round_trip(tls_params(daemon.port, certs.client_context()))


def test_tls_listener_does_not_speak_plain_amqp(fresh_amqplexd, certs):
    daemon = fresh_amqplexd(env=listener_env(certs))
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(PROTOCOL_HEADER)
        try:
            reply = sock.recv(4096)
        except ConnectionResetError:
            reply = b""
    # Whatever comes back (a TLS alert, or nothing) is not Connection.Start.
    assert not reply.startswith(b"\x01\x00\x00")


def test_required_client_certificate_refuses_a_client_without_one(fresh_amqplexd, certs):
    env = listener_env(
        certs, AMQP_TLS_CLIENT_CA_CERT=certs.client_ca_file, AMQP_TLS_VERIFY_CLIENT="required"
    )
    daemon = fresh_amqplexd(env=env)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(
            tls_params(daemon.port, certs.client_context(), connection_attempts=1)
        )
    # The same listener serves a client that brings one.
    round_trip(tls_params(daemon.port, certs.client_context(certs.client)))


def test_client_certificate_from_another_ca_is_refused(fresh_amqplexd, certs):
    env = listener_env(
        certs, AMQP_TLS_CLIENT_CA_CERT=certs.client_ca_file, AMQP_TLS_VERIFY_CLIENT="optional"
    )
    daemon = fresh_amqplexd(env=env)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(
            tls_params(daemon.port, certs.client_context(certs.rogue_client), connection_attempts=1)
        )


def test_optional_client_certificate_lets_a_client_without_one_in(fresh_amqplexd, certs):
    env = listener_env(
        certs, AMQP_TLS_CLIENT_CA_CERT=certs.client_ca_file, AMQP_TLS_VERIFY_CLIENT="optional"
    )
    daemon = fresh_amqplexd(env=env)
    round_trip(tls_params(daemon.port, certs.client_context()))


def test_client_ca_cert_is_not_trusted_for_the_broker(fresh_amqplexd, certs, tls_relay):
    """The CA for client certificates and the one for the broker are two
    settings: trusting a CA for clients does not make amqplex trust a broker
    it signed."""
    relay = tls_relay(certs.client_ca.issue_cert("localhost"))
    env = listener_env(
        certs,
        AMQP_TLS_CLIENT_CA_CERT=certs.client_ca_file,
        AMQP_TLS_VERIFY_CLIENT="required",
        AMQP_TLS_CA_CERT=certs.ca_file,
    )
    daemon = fresh_amqplexd(upstream=relay.url, env=env)
    with pytest.raises(pika.exceptions.AMQPConnectionError) as refused:
        pika.BlockingConnection(
            tls_params(daemon.port, certs.client_context(certs.client), connection_attempts=1)
        )
    assert "TLS handshake with the broker" in str(refused.value)


# -- the upstream ------------------------------------------------------------------------


def test_amqps_upstream_verified_against_ca_cert_with_sni(fresh_amqplexd, certs, tls_relay):
    relay = tls_relay(certs.broker)
    daemon = fresh_amqplexd(upstream=relay.url, env={"AMQP_TLS_CA_CERT": certs.ca_file})
    round_trip(proxy_params(daemon.port))
    assert relay.connection_count >= 1
    assert "localhost" in relay.server_names


def test_ready_probes_an_amqps_broker_over_tls(certs, tls_relay):
    """/ready's probe (when no worker holds or lately dialled an upstream)
    speaks TLS to an amqps:// broker, as the workers do."""
    relay = tls_relay(certs.broker)
    context = ssl.create_default_context(cafile=certs.ca_file)
    assert status._probe(relay.host, relay.port, context) == (True, "OK: broker answered a probe")
    # A plain protocol header gets no answer from a TLS port.
    assert status._probe(relay.host, relay.port, None)[0] is False


def test_tls_on_both_sides_at_once(fresh_amqplexd, certs, tls_relay):
    relay = tls_relay(certs.broker)
    daemon = fresh_amqplexd(
        upstream=relay.url, env=listener_env(certs, AMQP_TLS_CA_CERT=certs.ca_file)
    )
    round_trip(tls_params(daemon.port, certs.client_context()))
    assert relay.connection_count >= 1


def test_untrusted_broker_certificate_closes_clients_with_320_naming_tls(
    fresh_amqplexd, certs, tls_relay
):
    relay = tls_relay(certs.rogue_broker)
    daemon = fresh_amqplexd(
        upstream=relay.url,
        env={"AMQP_TLS_CA_CERT": certs.ca_file, "AMQP_UPSTREAM_CONNECT_TIMEOUT": "10"},
    )
    close, took = refused_at_login(daemon.port)
    assert close.reply_code == 320
    assert close.reply_text.startswith("CONNECTION_FORCED - ")
    assert "TLS handshake with the broker at localhost" in close.reply_text
    assert "certificate verify failed" in close.reply_text
    assert took < 5  # at once, not after upstream.connect_timeout
    log = daemon.wait_for_log("certificate verify failed")
    assert "TLS handshake with the broker" in log


def test_broker_certificate_for_another_host_is_refused(fresh_amqplexd, certs, tls_relay):
    relay = tls_relay(certs.elsewhere_broker, host="127.0.0.1")
    daemon = fresh_amqplexd(upstream=relay.url, env={"AMQP_TLS_CA_CERT": certs.ca_file})
    close, _ = refused_at_login(daemon.port)
    assert close.reply_code == 320
    assert "TLS handshake with the broker at 127.0.0.1" in close.reply_text
    assert "mismatch" in close.reply_text  # "IP address mismatch, certificate is not valid ..."


def test_os_trust_store_is_the_default_and_does_not_trust_a_private_ca(
    fresh_amqplexd, certs, tls_relay
):
    relay = tls_relay(certs.broker)
    daemon = fresh_amqplexd(upstream=relay.url)
    close, _ = refused_at_login(daemon.port)
    assert close.reply_code == 320
    assert "certificate verify failed" in close.reply_text


def test_skip_verify_connects_to_an_untrusted_broker_and_says_so(fresh_amqplexd, certs, tls_relay):
    relay = tls_relay(certs.rogue_broker, host="127.0.0.1")
    daemon = fresh_amqplexd(upstream=relay.url, env={"AMQP_TLS_SKIP_VERIFY": "true"})
    round_trip(proxy_params(daemon.port))
    assert "tls.skip_verify is on" in daemon.log_text()


def test_client_certificate_is_presented_to_a_broker_that_requires_one(
    fresh_amqplexd, certs, tls_relay
):
    relay = tls_relay(certs.broker, client_ca=certs.client_ca)
    env = {
        "AMQP_TLS_CA_CERT": certs.ca_file,
        "AMQP_TLS_CLIENT_CERT": certs.client_cert,
        "AMQP_TLS_CLIENT_KEY": certs.client_key,
    }
    daemon = fresh_amqplexd(upstream=relay.url, env=env)
    round_trip(proxy_params(daemon.port))
    presented = [cert for cert in relay.peer_certs if cert]
    assert presented, "amqplex presented no client certificate"
    assert ("DNS", "client.example") in presented[-1]["subjectAltName"]


def test_broker_requiring_a_client_certificate_without_one_gets_320(
    fresh_amqplexd, certs, tls_relay
):
    relay = tls_relay(certs.broker, client_ca=certs.client_ca)
    daemon = fresh_amqplexd(upstream=relay.url, env={"AMQP_TLS_CA_CERT": certs.ca_file})
    close, took = refused_at_login(daemon.port)
    assert close.reply_code == 320
    assert "TLS handshake with the broker at localhost" in close.reply_text
    assert took < 5


class CertificateDemandingBroker:
    """A TLS 1.3 server that wants a client certificate from `client_ca` and
    refuses a client without one as a broker does: an alert the client reads
    after its own side of the handshake is done, then a clean close. It
    forwards nothing: it is only there to refuse."""

    def __init__(self, identity: trustme.LeafCert, client_ca: trustme.CA) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        identity.configure_cert(self.context)
        client_ca.configure_trust(self.context)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.refusals: list[str] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                self.context.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError) as error:
                self.refusals.append(str(error))
            # Alert sent: close our side, then read what the client still had
            # in flight, so the close is a FIN (unread data would make it a
            # reset that can overtake the alert).
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):
                    pass
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def test_tls13_broker_alert_for_a_missing_client_certificate_reaches_clients(fresh_amqplexd, certs):
    broker = CertificateDemandingBroker(certs.broker, certs.client_ca)
    try:
        daemon = fresh_amqplexd(
            upstream=f"amqps://localhost:{broker.port}", env={"AMQP_TLS_CA_CERT": certs.ca_file}
        )
        close, took = refused_at_login(daemon.port)
    finally:
        broker.stop()
    assert close.reply_code == 320
    assert "TLS error: tlsv13 alert certificate required" in close.reply_text
    assert took < 5
    assert any("did not return a certificate" in refusal for refusal in broker.refusals)


def test_base64_certificates_from_the_environment(fresh_amqplexd, certs, tls_relay):
    relay = tls_relay(certs.broker, client_ca=certs.client_ca)
    env = {
        "AMQP_TLS_CERT": b64(certs.proxy_cert),
        "AMQP_TLS_KEY": b64(certs.proxy_key),
        "AMQP_TLS_CLIENT_CA_CERT": b64(certs.client_ca_file),
        "AMQP_TLS_VERIFY_CLIENT": "required",
        "AMQP_TLS_CA_CERT": b64(certs.ca_file),
        "AMQP_TLS_CLIENT_CERT": b64(certs.client_cert),
        "AMQP_TLS_CLIENT_KEY": b64(certs.client_key),
    }
    daemon = fresh_amqplexd(upstream=relay.url, env=env)
    round_trip(tls_params(daemon.port, certs.client_context(certs.client)))
    assert any(relay.peer_certs)
    # The key never shows, even base64-encoded.
    assert env["AMQP_TLS_KEY"] not in daemon.log_text()


# -- refused at start and on HUP -------------------------------------------------------------


def run_amqplexd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """amqplexd with `args` and only these AMQP_* variables, to its exit."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AMQP_")}
    return subprocess.run(
        [sys.executable, "-m", "amqplex", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def check(env: dict[str, str], upstream: str = "amqp://127.0.0.1:5672"):
    return run_amqplexd(upstream, "--check", env=env)


def env_name(key: str) -> str:
    return "AMQP_" + key.replace(".", "_").upper()


def test_a_key_given_as_mangled_base64_is_refused_without_showing_it(certs):
    """Cut short, base64 of a key is neither PEM nor a file name: refused,
    naming the setting, with none of the value in the message (its first
    characters are the key's)."""
    mangled = b64(certs.proxy_key)[:201]  # not a whole base64 quantum: no PEM
    result = check(listener_env(certs, AMQP_TLS_KEY=mangled))
    assert result.returncode == 1
    assert "configuration error: tls.key: " in result.stderr
    assert mangled[20:60] not in result.stderr


def test_an_upstream_key_given_as_mangled_base64_is_refused_without_showing_it(certs):
    mangled = b64(certs.client_key)[:201]
    env = {"AMQP_TLS_CLIENT_CERT": certs.client_cert, "AMQP_TLS_CLIENT_KEY": mangled}
    result = check(env, upstream="amqps://broker.example")
    assert result.returncode == 1
    assert "configuration error: tls.client_key: " in result.stderr
    assert mangled[20:60] not in result.stderr


def test_check_masks_a_private_key_bundled_in_the_certificate_setting(certs):
    """tls.cert may hold the key too (the README says so): --check, which the
    unit runs at every start and reload, must not print it to the journal."""
    bundle = Path(certs.proxy_cert).read_bytes() + Path(certs.proxy_key).read_bytes()
    encoded = base64.b64encode(bundle).decode()
    result = check({"AMQP_TLS_CERT": encoded})
    assert result.returncode == 0, result.stderr
    assert encoded[:40] not in result.stdout
    assert "cert: '********'" in result.stdout


@pytest.mark.parametrize(
    ("setting", "problem", "said"),
    [
        ("tls.cert", "missing file", "no such file"),
        ("tls.key", "key of another certificate", "does not match the certificate in tls.cert"),
        ("tls.cert", "expired certificate", "expired on 2021-01-01"),
        ("tls.cert", "certificate not valid yet", "is not valid before"),
        ("tls.key", "not a key", "holds no PEM private key"),
        ("tls.client_ca_cert", "missing file", "no such file"),
    ],
)
def test_bad_listener_certificate_settings_are_refused_at_start(certs, setting, problem, said):
    env = listener_env(certs)
    if problem == "missing file":
        env[env_name(setting)] = str(certs.directory / "absent.pem")
        if setting == "tls.client_ca_cert":
            env["AMQP_TLS_VERIFY_CLIENT"] = "required"
    elif problem == "key of another certificate":
        env["AMQP_TLS_KEY"] = certs.client_key
    elif problem == "expired certificate":
        env.update(AMQP_TLS_CERT=certs.expired_cert, AMQP_TLS_KEY=certs.expired_key)
    elif problem == "certificate not valid yet":
        env.update(AMQP_TLS_CERT=certs.future_cert, AMQP_TLS_KEY=certs.future_key)
    elif problem == "not a key":
        env["AMQP_TLS_KEY"] = certs.ca_file
    result = check(env)
    assert result.returncode == 1
    assert f"configuration error: {setting}: " in result.stderr
    assert said in result.stderr


@pytest.mark.parametrize(
    ("setting", "problem", "said"),
    [
        ("tls.ca_cert", "missing file", "no such file"),
        ("tls.client_key", "key of another certificate", "does not match"),
        ("tls.client_cert", "expired certificate", "expired on 2021-01-01"),
    ],
)
def test_bad_upstream_certificate_settings_are_refused_at_start(certs, setting, problem, said):
    env = {"AMQP_TLS_CLIENT_CERT": certs.client_cert, "AMQP_TLS_CLIENT_KEY": certs.client_key}
    if problem == "missing file":
        env[env_name(setting)] = str(certs.directory / "absent.pem")
    elif problem == "key of another certificate":
        env["AMQP_TLS_CLIENT_KEY"] = certs.proxy_key
    elif problem == "expired certificate":
        env.update(AMQP_TLS_CLIENT_CERT=certs.expired_cert, AMQP_TLS_CLIENT_KEY=certs.expired_key)
    result = check(env, upstream="amqps://broker.example")
    assert result.returncode == 1
    assert f"configuration error: {setting}: " in result.stderr
    assert said in result.stderr


def test_daemon_with_a_bad_certificate_does_not_start(certs):
    """Not only --check: the daemon itself exits 1 before it listens."""
    env = listener_env(certs, AMQP_TLS_KEY=certs.client_key)
    result = run_amqplexd("-l", "127.0.0.1", "-p", str(free_port()), env=env)
    assert result.returncode == 1
    said = "configuration error: tls.key: does not match the certificate in tls.cert"
    assert said in result.stderr


def test_hup_with_a_bad_certificate_keeps_the_running_tls_configuration(
    fresh_amqplexd, certs, tmp_path
):
    config = tmp_path / "amqplex.yaml"
    good = {"tls": {"cert": certs.proxy_cert, "key": certs.proxy_key}}
    config.write_text(yaml.safe_dump(good))
    daemon = fresh_amqplexd("-c", str(config))
    round_trip(tls_params(daemon.port, certs.client_context()))
    config.write_text(
        yaml.safe_dump({"tls": {"cert": certs.expired_cert, "key": certs.expired_key}})
    )
    os.kill(daemon.process.pid, signal.SIGHUP)
    log = daemon.wait_for_log("reload refused")
    assert "tls.cert: the certificate for localhost expired" in log
    round_trip(tls_params(daemon.port, certs.client_context()))


def test_hup_reloads_rotated_certificate_files(fresh_amqplexd, certs, tmp_path):
    """Certificates replaced in place are read again on HUP: new clients get
    the new one, with no restart."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(Path(certs.proxy_cert).read_bytes())
    key.write_bytes(Path(certs.proxy_key).read_bytes())
    config = tmp_path / "amqplex.yaml"
    config.write_text(yaml.safe_dump({"tls": {"cert": str(cert), "key": str(key)}}))
    daemon = fresh_amqplexd("-c", str(config))
    round_trip(tls_params(daemon.port, certs.client_context()))
    renewed = certs.rogue_ca.issue_cert("localhost")
    cert.write_bytes(b"".join(blob.bytes() for blob in renewed.cert_chain_pems))
    key.write_bytes(renewed.private_key_pem.bytes())
    trusts_renewed = ssl.create_default_context()
    certs.rogue_ca.configure_trust(trusts_renewed)
    os.kill(daemon.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while True:
        try:
            round_trip(tls_params(daemon.port, trusts_renewed, connection_attempts=1))
            break
        except (pika.exceptions.AMQPConnectionError, ssl.SSLError):
            # An old worker may take this connection until it has stopped accepting.
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            time.sleep(0.1)
    assert "reload refused" not in daemon.log_text()


# -- the settings, in process ---------------------------------------------------------------


def test_amqps_url_defaults_to_port_5671():
    assert UpstreamConfig(url="amqps://broker.example").port == 5671
    assert UpstreamConfig(url="amqp://broker.example").port == 5672
    assert UpstreamConfig(url="amqps://broker.example:6000").port == 6000


def test_a_setting_takes_a_file_base64_pem_or_pem_text(certs):
    pem = Path(certs.ca_file).read_bytes()
    assert tls.read_pem("tls.ca_cert", certs.ca_file) == pem
    assert tls.read_pem("tls.ca_cert", b64(certs.ca_file)) == pem
    assert tls.read_pem("tls.ca_cert", pem.decode()) == pem


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AMQP_TLS_VERIFY_CLIENT": "sometimes"}, "tls.verify_client: must be one of"),
        ({"AMQP_TLS_VERIFY_CLIENT": "required"}, "tls.verify_client: the client listener"),
        ({"AMQP_TLS_CA_CERT": "/x.pem"}, "tls.ca_cert: only used for an amqps:// upstream"),
        ({"AMQP_TLS_SKIP_VERIFY": "true"}, "tls.skip_verify: only used for an amqps://"),
        ({"AMQP_UPSTREAM_URL": "amqps://"}, "upstream.url: expected amqp://host[:port]"),
    ],
)
def test_tls_settings_that_cannot_work_are_refused_naming_the_key(env, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        load(None, environ=env)


def test_listener_needs_a_client_ca_for_verify_client(certs):
    with pytest.raises(
        ConfigError, match="^tls.verify_client: 'required' needs tls.client_ca_cert"
    ):
        load(None, environ=listener_env(certs, AMQP_TLS_VERIFY_CLIENT="required"))
    with pytest.raises(ConfigError, match="^tls.verify_client: is none"):
        load(None, environ=listener_env(certs, AMQP_TLS_CLIENT_CA_CERT=certs.client_ca_file))


def test_key_in_the_certificate_file_is_enough(certs, tmp_path):
    both = tmp_path / "both.pem"
    both.write_bytes(certs.proxy.private_key_and_cert_chain_pem.bytes())
    config = load(None, environ={"AMQP_TLS_CERT": str(both)})
    assert tls.build(config).listener is not None


def test_skip_verify_warning_is_given_for_amqps_only():
    config = Config()
    config.tls.skip_verify = True
    config.upstream.url = "amqps://broker.example"
    assert any("NOT verified" in line for line in tls.warnings_for(config))
    config.upstream.url = "amqp://broker.example"
    assert tls.warnings_for(config) == []


def test_start_log_says_which_sides_use_tls(certs):
    config = load(
        None,
        environ=listener_env(
            certs,
            AMQP_UPSTREAM_URL="amqps://broker.example",
            AMQP_TLS_CA_CERT=certs.ca_file,
            AMQP_TLS_CLIENT_CA_CERT=certs.client_ca_file,
            AMQP_TLS_VERIFY_CLIENT="required",
        ),
    )
    assert tls.summary(config) == (
        "TLS: client listener speaks TLS (client certificates: required); "
        "upstream is amqps, verified against tls.ca_cert"
    )
    assert tls.summary(Config()) == "TLS: off"
