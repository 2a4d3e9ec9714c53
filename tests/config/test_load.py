"""Configuration loading: YAML and TOML files (the AMQPlex keys stay valid),
defaults < file < AMQP_<SECTION>_<KEY> environment < command line, durations,
refusals that name the key and what is allowed, the default file locations,
the shipped reference file, and `amqplexd --check` / `--print-defaults` run
as the real command."""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from amqplex.config import Config, ConfigError, load
from amqplex.config.load import describe, reference
from amqplex.config.settings import mask_password

# The module, not the function amqplex.config exports under the same name.
load_module = importlib.import_module("amqplex.config.load")

ROOT = Path(__file__).resolve().parents[2]
ETC_YAML = ROOT / "etc" / "amqplex.yaml"
ETC_TOML = ROOT / "etc" / "amqplex.toml"

# The keys of the original AMQPlex configuration, which stay valid.
AMQPLEX_KEYS = [
    "listen.address",
    "listen.port",
    "upstream.url",
    "pool.max_channels",
    "pool.idle_timeout",
    "pool.cleanup_interval",
    "pool.max_upstream_connections",
    "pool.max_client_connections",
    "tls.cert",
    "tls.key",
    "tls.ca_cert",
    "tls.client_cert",
    "tls.client_key",
    "tls.skip_verify",
]


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


def value_of(config: Config, key: str) -> object:
    target: object = config
    for part in key.split("."):
        target = getattr(target, part)
    return target


def all_keys() -> list[tuple[str, dataclasses.Field]]:
    """Every setting as (dotted key, field), walked from the schema itself."""
    keys = []
    for field in dataclasses.fields(Config):
        if field.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
            field.default_factory
        ):
            keys.extend(
                (f"{field.name}.{inner.name}", inner)
                for inner in dataclasses.fields(field.default_factory)
            )
        else:
            keys.append((field.name, field))
    return keys


def refusal(path: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path, **{"environ": {}, **kwargs})
    return str(caught.value)


def amqplexd(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command, with no AMQP_* variables but the test's own."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("AMQP_")}
    return subprocess.run(
        [sys.executable, "-m", "amqplex", *args],
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


# -- files --------------------------------------------------------------------


def test_yaml_file_sets_sections_and_top_level_keys(tmp_path):
    path = write(
        tmp_path,
        "amqplex.yaml",
        "listen:\n  address: 127.0.0.1\n  port: 6000\n"
        "pool:\n  max_channels: 100\n  idle_channels: 0\n"
        "upstream:\n  exchange_types: [x-delayed-message]\n"
        "workers: 3\ndrain_timeout: 10\n",
    )
    config = load(path, environ={})
    assert config.listen.address == "127.0.0.1"
    assert config.listen.port == 6000
    assert config.pool.max_channels == 100
    assert config.pool.idle_channels == 0
    assert config.upstream.exchange_types == ["x-delayed-message"]
    assert config.workers == 3
    assert config.drain_timeout == 10.0
    assert config.client == Config().client  # untouched sections keep their defaults


def test_toml_file_in_the_amqplex_format_loads(tmp_path):
    # The original AMQPlex example: integer seconds, its own max_channels.
    path = write(
        tmp_path,
        "config.toml",
        '[listen]\naddress = "0.0.0.0"\nport = 5673\n\n'
        "[pool]\nidle_timeout = 5\nmax_channels = 65535\ncleanup_interval = 15\n"
        "max_upstream_connections = 4\nmax_client_connections = 1000\n\n"
        '[upstream]\nurl = "amqp://rabbitmq.example.com:5672"\n\n'
        "[tls]\nskip_verify = false\n",
    )
    config = load(path, environ={})
    assert config.listen.port == 5673
    assert config.pool.idle_timeout == 5.0
    assert config.pool.max_channels == 65535
    assert config.pool.cleanup_interval == 15.0
    assert config.pool.max_upstream_connections == 4
    assert config.pool.max_client_connections == 1000
    assert config.upstream.host == "rabbitmq.example.com"
    assert config.upstream.port == 5672
    assert config.tls.skip_verify is False


def test_shipped_toml_example_loads():
    config = load(str(ETC_TOML), environ={})
    assert config.pool.idle_timeout == 300.0  # "5m"
    assert config.pool.cleanup_interval == 30.0  # "30s"
    assert config.listen.port == 5673


def test_every_amqplex_key_is_a_known_setting(tmp_path):
    """Each AMQPlex key, set in a TOML file to its default, loads."""
    defaults = Config()
    sections: dict[str, dict] = {}
    for key in AMQPLEX_KEYS:
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value_of(defaults, key)
    text = ""
    for section, values in sections.items():
        text += f"[{section}]\n"
        for name, value in values.items():
            rendered = str(value).lower() if isinstance(value, bool) else repr(value)
            text += f"{name} = {rendered}\n".replace("'", '"')
    config = load(write(tmp_path, "all.toml", text), environ={})
    assert config == defaults


@pytest.mark.parametrize("key", [key for key in AMQPLEX_KEYS if key.startswith("tls.")])
def test_tls_keys_are_recognised_when_given_a_value(tmp_path, key):
    """A TLS value is either accepted or refused for what it is, never as an unknown key."""
    section, name = key.split(".")
    value = "true" if name == "skip_verify" else '"/etc/amqplex/some.pem"'
    path = write(tmp_path, "tls.toml", f"[{section}]\n{name} = {value}\n")
    try:
        config = load(path, environ={})
    except ConfigError as error:
        assert str(error).startswith(f"{key}: ")
        assert "unknown" not in str(error)
    else:
        assert value_of(config, key) not in ("", False)


def test_section_with_every_key_commented_out_loads(tmp_path):
    # What a copy of etc/amqplex.yaml looks like once a section is trimmed.
    path = write(tmp_path, "trimmed.yaml", "listen:\n  port: 6001\ntls:\n  # cert: ''\n")
    config = load(path, environ={})
    assert config.listen.port == 6001
    assert config.tls == Config().tls


def test_empty_file_gives_the_defaults(tmp_path):
    assert load(write(tmp_path, "empty.yaml", ""), environ={}) == Config()


# -- priority -----------------------------------------------------------------


def test_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, "a.yaml", "listen:\n  port: 6000\npool:\n  max_channels: 100\n")
    config = load(path, environ={"AMQP_LISTEN_PORT": "6001"})
    assert config.listen.port == 6001
    assert config.pool.max_channels == 100  # not in the environment: the file's


def test_command_line_overrides_environment_and_file(tmp_path):
    path = write(tmp_path, "a.yaml", "listen:\n  port: 6000\nworkers: 2\n")
    config = load(
        path,
        environ={"AMQP_LISTEN_PORT": "6001", "AMQP_WORKERS": "3"},
        overrides={"listen.port": 6002},
    )
    assert config.listen.port == 6002
    assert config.workers == 3  # no flag: the environment's


def test_environment_values_take_each_settings_type():
    config = load(
        None,
        environ={
            "AMQP_POOL_IDLE_TIMEOUT": "2m",
            "AMQP_DRAIN_TIMEOUT": "500ms",
            "AMQP_WORKERS": "3",
            "AMQP_CLIENT_HEARTBEAT": "0",
            "AMQP_UPSTREAM_EXCHANGE_TYPES": "x-delayed-message, x-consistent-hash",
            "AMQP_LISTEN_ADDRESS": "127.0.0.1",
        },
    )
    assert config.pool.idle_timeout == 120.0
    assert config.drain_timeout == 0.5
    assert config.workers == 3
    assert config.client.heartbeat == 0
    assert config.upstream.exchange_types == ["x-delayed-message", "x-consistent-hash"]
    assert config.listen.address == "127.0.0.1"


def test_other_amqp_variables_are_left_alone():
    # Programs around the proxy use AMQP_URL and the like; they are not settings.
    assert load(None, environ={"AMQP_URL": "amqp://x", "AMQP_TEST_URL": "y"}) == load(
        None, environ={}
    )


# -- durations ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
        ("45", 45.0),
        (45, 45.0),
        (2.5, 2.5),
    ],
)
def test_durations_are_seconds_or_text_with_a_unit(tmp_path, written, seconds):
    path = write(tmp_path, "d.yaml", yaml.safe_dump({"pool": {"idle_timeout": written}}))
    assert load(path, environ={}).pool.idle_timeout == seconds


@pytest.mark.parametrize("written", ["5 minutes", "5d", "-5s", "soon", ""])
def test_bad_durations_are_refused_with_the_allowed_forms(tmp_path, written):
    path = write(tmp_path, "d.yaml", yaml.safe_dump({"pool": {"idle_timeout": written}}))
    message = refusal(path)
    assert message.startswith("pool.idle_timeout: ")
    assert "'30s'" in message and "'5m'" in message


# -- refusals -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("bogus: 1\n", "bogus", "(known: client, drain_timeout, listen, "),
        ("pool:\n  max_chanels: 10\n", "pool.max_chanels", "max_channels"),
        ("pool: 5\n", "pool", "expected a section of settings"),
        ("listen:\n  port: five\n", "listen.port", "expected a whole number"),
        ("pool:\n  max_channels: 10.5\n", "pool.max_channels", "expected a whole number"),
        ("workers: true\n", "workers", "expected a whole number"),
        ("listen:\n  port: '5673'\n", "listen.port", "expected a whole number"),
        ("listen:\n  address: 127\n", "listen.address", "expected text"),
        ("tls:\n  skip_verify: maybe\n", "tls.skip_verify", "expected true or false"),
        ("upstream:\n  exchange_types: x-delayed\n", "upstream.exchange_types", "list of names"),
        ("listen:\n  port: 70000\n", "listen.port", "must be at most 65535"),
        ("listen:\n  port: 0\n", "listen.port", "must be at least 1"),
        ("workers: 0\n", "workers", "must be at least 1"),
        ("drain_timeout: -1\n", "drain_timeout", "must be at least 0"),
        ("pool:\n  max_channels: 0\n", "pool.max_channels", "must be at least 1"),
        ("client:\n  max_output_buffer: 10\n", "client.max_output_buffer", "at least 65536"),
        ("upstream:\n  url: http://broker\n", "upstream.url", "expected amqp://host[:port]"),
        ("upstream:\n  url: amqp://broker:99999\n", "upstream.url", "bad port"),
        ("client:\n  stall_timeout: .nan\n", "client.stall_timeout", "a finite number"),
        ("upstream:\n  read_gather: .inf\n", "upstream.read_gather", "a finite number"),
        ("listen:\n  port: 65535\n", "metrics.port", "set metrics.port"),
        ("listen:\n  port: 6000\nmetrics:\n  port: 6000\n", "metrics.port", "listen.port"),
        (
            "listen:\n  port: 6000\nmetrics:\n  address: 127.0.0.1\n  port: 6000\n",
            "metrics.port",
            "listen.port",
        ),
        ("upstream:\n  url: amqp://broker:0\n", "upstream.url", "bad port"),
        ("upstream:\n  url: amqp://broker/?heartbeat=5\n", "upstream.url", "heartbeat=5"),
        ("listen:\n  address: 999.1.1.1\n", "listen.address", "not an address to listen on"),
        ("metrics:\n  address: no such host.\n", "metrics.address", "not an address"),
    ],
)
def test_bad_file_values_are_refused_naming_the_key(tmp_path, text, key, allowed):
    message = refusal(write(tmp_path, "bad.yaml", text))
    assert message.startswith(f"{key}: ")
    assert allowed in message


def test_a_bad_port_in_the_upstream_url_is_refused_without_its_password(tmp_path):
    message = refusal(write(tmp_path, "bad.yaml", "upstream:\n  url: amqp://u:s3cret@h:99999\n"))
    assert message.startswith("upstream.url: bad port")
    assert "s3cret" not in message


def test_metrics_may_share_listen_port_on_another_address(tmp_path):
    text = (
        "listen:\n  address: 127.0.0.1\n  port: 6000\n"
        "metrics:\n  address: 127.0.0.2\n  port: 6000\n"
    )
    assert load(write(tmp_path, "ok.yaml", text), environ={}).metrics.port == 6000


def test_bad_environment_value_is_refused_naming_the_key():
    message = refusal(None, environ={"AMQP_POOL_MAX_CHANNELS": "lots"})
    assert message.startswith("pool.max_channels: expected a whole number")


def test_out_of_range_environment_value_is_refused_naming_the_key():
    message = refusal(None, environ={"AMQP_LISTEN_PORT": "65536"})
    assert message.startswith("listen.port: must be at most 65535")


def test_out_of_range_command_line_value_is_refused_naming_the_key():
    message = refusal(None, overrides={"workers": 0})
    assert message.startswith("workers: must be at least 1")


def test_unparseable_files_are_refused_naming_the_file(tmp_path):
    toml = write(tmp_path, "bad.toml", "[listen\nport = 1\n")
    assert refusal(toml).startswith(f"{toml}: not valid TOML")
    listed = write(tmp_path, "list.yaml", "- listen\n- pool\n")
    assert refusal(listed).startswith(f"{listed}: expected a mapping")
    missing = str(tmp_path / "missing.yaml")
    assert refusal(missing).startswith(f"{missing}: cannot read")


# -- where the file is looked for -----------------------------------------------


def test_default_paths_are_working_directory_then_etc():
    assert load_module.DEFAULT_PATHS == ("./amqplex.yaml", "/etc/amqplex/amqplex.yaml")


def test_without_a_path_amqplex_yaml_in_the_working_directory_is_read(tmp_path, monkeypatch):
    write(tmp_path, "amqplex.yaml", "listen:\n  port: 6010\n")
    monkeypatch.chdir(tmp_path)
    assert load(None, environ={}).listen.port == 6010


def test_without_a_path_the_second_location_is_read_when_the_first_is_missing(
    tmp_path, monkeypatch
):
    # /etc is not the test's to write: the second location is pointed elsewhere.
    etc = write(tmp_path, "etc-amqplex.yaml", "listen:\n  port: 6011\n")
    monkeypatch.setattr(load_module, "DEFAULT_PATHS", ("./amqplex.yaml", etc))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert load(None, environ={}).listen.port == 6011
    write(cwd, "amqplex.yaml", "listen:\n  port: 6012\n")
    assert load(None, environ={}).listen.port == 6012  # the working directory wins


def test_without_a_path_or_any_file_the_defaults_apply(tmp_path, monkeypatch):
    if os.path.exists("/etc/amqplex/amqplex.yaml"):
        pytest.skip("this machine has /etc/amqplex/amqplex.yaml")
    monkeypatch.chdir(tmp_path)
    assert load(None, environ={}) == Config()


# -- the reference file -------------------------------------------------------


def test_etc_amqplex_yaml_is_the_generated_reference():
    assert ETC_YAML.read_text() == reference()


def test_reference_is_the_same_on_a_machine_with_another_cpu_count(tmp_path):
    # The workers default is the CPU count where amqplexd runs; the shipped
    # file must not carry the count of the machine that generated it.
    script = (
        "import os; os.cpu_count = lambda: 97\n"
        "from amqplex.config.load import reference\n"
        "print(reference(), end='')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ETC_YAML.read_text()


def test_etc_amqplex_yaml_loads_to_the_defaults():
    assert load(str(ETC_YAML), environ={}) == Config()


def test_reference_documents_every_key_with_its_default():
    lines = reference().splitlines()
    defaults = Config()
    loaded = yaml.safe_load(reference())
    for key, field in all_keys():
        section, _, name = key.rpartition(".")
        default = value_of(defaults, key)
        rendered = yaml.safe_dump({name: default}, default_flow_style=True).strip()[1:-1]
        indent = "  " if section else ""
        if key == "workers":
            # The CPU count of the machine that runs amqplexd: left commented.
            entry = "# workers: <CPU count>"
        else:
            entry = rendered
            where = loaded[section] if section else loaded
            assert where[name] == default, key
        # Look from the section's header on: two sections both have `heartbeat`.
        start = lines.index(f"{section}:") if section else 0
        index = lines.index(f"{indent}{entry}", start)
        assert lines[index - 1] == f"{indent}# {field.metadata['help']}", key


# -- describe -----------------------------------------------------------------


def test_describe_masks_secret_settings():
    config = Config()
    config.tls.cert = "/etc/amqplex/cert.pem"
    config.tls.key = "PRIVATE-KEY-TEXT"
    config.tls.client_key = "CLIENT-KEY-TEXT"
    text = describe(config)
    assert "PRIVATE-KEY-TEXT" not in text and "CLIENT-KEY-TEXT" not in text
    shown = yaml.safe_load(text)["tls"]
    assert shown["key"] == shown["client_key"] == "********"
    assert shown["cert"] == "/etc/amqplex/cert.pem"  # not a secret: shown


def test_describe_masks_a_password_in_the_upstream_url(tmp_path):
    path = write(tmp_path, "u.yaml", "upstream:\n  url: amqp://bob:hunter2@broker:5672/\n")
    text = describe(load(path, environ={}))
    assert "hunter2" not in text
    assert yaml.safe_load(text)["upstream"]["url"].startswith("amqp://bob:")
    assert "@broker:5672/" in text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://bob:hunter2@broker:5672/vh", "amqp://bob:********@broker:5672/vh"),
        ("amqp://bob:p%40ss@broker", "amqp://bob:********@broker"),
        ("amqp://:hunter2@broker", "amqp://:********@broker"),
        ("amqp://bob@broker:5672", "amqp://bob@broker:5672"),
        ("amqp://127.0.0.1:5672", "amqp://127.0.0.1:5672"),
        # Unescaped, these end the authority early for a URL parser.
        ("amqp://app:s3cr/et@rabbit:5672", "amqp://app:********@rabbit:5672"),
        ("amqp://app:9999/xyz@rabbit", "amqp://app:********@rabbit"),
        ("amqps://app:a?b#c@rabbit/vh", "amqps://app:********@rabbit/vh"),
    ],
)
def test_mask_password_hides_only_the_password(url, shown):
    assert mask_password(url) == shown


def test_describe_output_loads_back_to_the_same_configuration(tmp_path):
    source = write(
        tmp_path,
        "a.yaml",
        "listen:\n  port: 6020\npool:\n  idle_timeout: 2m\n"
        "upstream:\n  exchange_types: [x-delayed-message]\nworkers: 5\n",
    )
    config = load(source, environ={})
    again = load(write(tmp_path, "b.yaml", describe(config)), environ={})
    assert again == config


# -- the command --------------------------------------------------------------


def test_check_prints_the_effective_configuration_and_exits_0(tmp_path):
    path = write(tmp_path, "a.yaml", "listen:\n  port: 6030\npool:\n  max_channels: 100\n")
    result = amqplexd(
        "--check", "-c", path, "-w", "2", cwd=tmp_path, env={"AMQP_POOL_MAX_CHANNELS": "77"}
    )
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["listen"]["port"] == 6030  # file
    assert shown["pool"]["max_channels"] == 77  # environment over file
    assert shown["workers"] == 2  # flag
    assert shown["pool"]["idle_timeout"] == 300.0  # default


def test_check_flags_override_the_environment(tmp_path):
    path = write(tmp_path, "a.yaml", "listen:\n  port: 6031\n")
    result = amqplexd(
        "--check", "-c", path, "-p", "6033", cwd=tmp_path, env={"AMQP_LISTEN_PORT": "6032"}
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["listen"]["port"] == 6033


def test_check_masks_secrets(tmp_path):
    path = write(tmp_path, "a.yaml", "upstream:\n  url: amqp://bob:hunter2@127.0.0.1:5672/\n")
    result = amqplexd("--check", "-c", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "upstream:" in result.stdout


def test_check_without_c_reads_the_working_directory_file(tmp_path):
    write(tmp_path, "amqplex.yaml", "listen:\n  port: 6034\n")
    result = amqplexd("--check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["listen"]["port"] == 6034


def test_check_accepts_the_shipped_files(tmp_path):
    for path in (ETC_YAML, ETC_TOML):
        result = amqplexd("--check", "-c", str(path), cwd=tmp_path)
        assert result.returncode == 0, (path, result.stderr)
        assert yaml.safe_load(result.stdout)["listen"]["port"] == 5673


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pool:\n  max_channels: 0\n", "pool.max_channels: must be at least 1"),
        ("pool:\n  max_chanels: 10\n", "pool.max_chanels: unknown key"),
        ("listen:\n  port: high\n", "listen.port: expected a whole number"),
    ],
)
def test_check_bad_file_exits_1_naming_the_key(tmp_path, text, expected):
    path = write(tmp_path, "bad.yaml", text)
    result = amqplexd("--check", "-c", path, cwd=tmp_path)
    assert result.returncode == 1
    assert expected in result.stderr
    assert result.stdout == ""


def test_check_bad_environment_exits_1_naming_the_key(tmp_path):
    result = amqplexd(
        "--check", "-c", str(ETC_YAML), cwd=tmp_path, env={"AMQP_CLIENT_HEARTBEAT": "-1"}
    )
    assert result.returncode == 1
    assert "client.heartbeat: must be at least 0" in result.stderr


def test_print_defaults_prints_the_reference(tmp_path):
    result = amqplexd("--print-defaults", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference()
