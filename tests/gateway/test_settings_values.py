"""``Settings.from_env`` refuses numbers and URLs no part of govgate could use, naming the variable.

The settings with a range of their own (tests/gateway/test_database_busy_timeout.py,
tests/workers/test_stream_pieces.py, ...) keep their own messages; every other
number is finite, at most 1e9 (seconds) or 2**31 - 1 (counts), and written in
ASCII digits.
"""

from __future__ import annotations

from dataclasses import fields

import pytest

from gateway.settings import Settings, SettingsError

#: The float settings read by ``number`` alone (bounded by it), and those with a range of their own.
FLOAT_SETTINGS = ["POLICY_TIMEOUT_S", "POLICY_WAIT_TIMEOUT_S", "POLICY_RELOAD_INTERVAL_S", "REQUEST_TIMEOUT_S",
                  "DRAIN_S",
                  "GENERATION_TIME_LIMIT_S", "TERMINAL_RETRY_HORIZON_S", "TERMINAL_RETRY_INTERVAL_S",
                  "OUTPUT_VERDICT_TIMEOUT_S",
                  "AUTH_CACHE_TTL_S", "CHECKPOINT_INTERVAL_S", "CONSOLE_IDLE_TIMEOUT_S"]
OWN_RANGE = {"DATABASE_BUSY_TIMEOUT_S": "must be more than 0 and at most 86400 seconds",
             "WORKER_START_TIMEOUT_S": "must be more than 0 and at most 86400 seconds",
             "REDELIVERY_MARGIN_S": "must be more than 0 and at most 86400 seconds",
             "REDIS_TIMEOUT_S": "must be more than 0 and at most 86400 seconds",
             "STREAM_FLUSH_INTERVAL_MS": "must be between 0 and 1000 milliseconds",
             "TIMEOUT_GRACE_S": "must be a finite number"}
#: The whole-number settings but the port (which has its own range).
INT_SETTINGS = ["POLICY_VM_CHECK_EVERY", "ADMISSION_CONCURRENCY", "OUTPUT_HOLDBACK_CHARS", "MAX_QUEUED_PER_MODEL",
                "MAX_BODY_BYTES", "DEFAULT_MAX_TOKENS", "REDIS_MAX_CONNECTIONS", "AUTH_CACHE_SIZE",
                "CHECKPOINT_EVERY_ENTRIES"]


def _refused(name: str, raw: str, message: str) -> None:
    with pytest.raises(SettingsError, match=f"^GOVGATE_{name}='{raw}' {message}"):
        Settings.from_env({f"GOVGATE_{name}": raw})


def test_the_lists_here_name_every_number_setting() -> None:
    """A new number setting is covered here, or these lists are updated."""
    declared = {f.name.upper(): f.type for f in fields(Settings)}
    assert sorted(FLOAT_SETTINGS + list(OWN_RANGE)) == sorted(n for n, t in declared.items() if t == "float")
    assert sorted(INT_SETTINGS + ["PORT", "POLICY_EVALUATORS"]) == sorted(n for n, t in declared.items() if t == "int")


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN", "1e999"])
@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_float_settings_refuse_what_is_not_a_finite_number(name: str, raw: str) -> None:
    _refused(name, raw, "must be a finite number")


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_float_settings_refuse_more_than_a_billion(name: str) -> None:
    _refused(name, "1000000001", r"must be at most 1e\+09")
    assert getattr(Settings.from_env({f"GOVGATE_{name}": "1e9"}), name.lower()) == 1e9


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", sorted(OWN_RANGE))
def test_settings_with_their_own_range_keep_their_message(name: str, raw: str) -> None:
    _refused(name, raw, OWN_RANGE[name])


@pytest.mark.parametrize("name", INT_SETTINGS)
def test_int_settings_refuse_more_than_the_largest_count(name: str) -> None:
    _refused(name, "18446744073709551616", "must be at most 2147483647")
    _refused(name, "2147483648", "must be at most 2147483647")
    assert getattr(Settings.from_env({f"GOVGATE_{name}": "2147483647"}), name.lower()) == 2**31 - 1


@pytest.mark.parametrize(("name", "noun"), [("DEFAULT_MAX_TOKENS", "whole number"), ("PORT", "whole number"),
                                            ("REQUEST_TIMEOUT_S", "number"),
                                            ("DATABASE_BUSY_TIMEOUT_S", "number")])
@pytest.mark.parametrize("raw", ["\u0661\u0662", "\uff11\uff12", "1\u0662",  # Arabic-Indic, fullwidth, mixed
                                 "1_000", "0x10", "1 2"])  # Python's digit groups, hex, two numbers
def test_digits_of_other_scripts_and_python_spellings_are_refused(name: str, noun: str, raw: str) -> None:
    _refused(name, raw, f"is not a {noun}$")


@pytest.mark.parametrize(("raw", "message"), [("0", "must be at least 1$"), ("70000", "must be at most 65535$"),
                                              ("65536", "must be at most 65535$")])
def test_the_port_is_one_to_65535(raw: str, message: str) -> None:
    _refused("PORT", raw, message)
    assert Settings.from_env({"GOVGATE_PORT": "1"}).port == 1
    assert Settings.from_env({"GOVGATE_PORT": "65535"}).port == 65535


@pytest.mark.parametrize(("name", "good", "bad"), [
    ("REDIS_URL", ["redis://127.0.0.1:6379/0", "rediss://cache.example:6380/1", "unix:///tmp/r.sock"],
     ["not a url", "http://127.0.0.1:6379", "127.0.0.1:6379"]),
    ("OPA_URL", ["http://127.0.0.1:8181", "https://opa.example"], ["not a url", "localhost:8181", "ftp://x"]),
])
def test_urls_must_have_a_scheme_the_client_speaks(name: str, good: list[str], bad: list[str]) -> None:
    for value in good:
        assert getattr(Settings.from_env({f"GOVGATE_{name}": value}), name.lower()) == value
    assert getattr(Settings.from_env({f"GOVGATE_{name}": ""}), name.lower()) == ""
    for value in bad:
        with pytest.raises(SettingsError, match=f"^GOVGATE_{name} must start with one of: "):
            Settings.from_env({f"GOVGATE_{name}": value})


@pytest.mark.parametrize("value", ["redis:/u:secret@127.0.0.1:6379", "redis:u:secret@host", "u:secret@host:1"])
def test_a_malformed_url_is_refused_without_its_password(value: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"GOVGATE_REDIS_URL": value})
    assert "secret" not in str(refused.value) and "must start with one of" in str(refused.value)


def test_the_metrics_token_is_long_plain_and_never_echoed() -> None:
    good = "0123456789abcdef" * 4
    settings = Settings.from_env({"GOVGATE_METRICS_TOKEN": good})
    assert settings.metrics_token == good and good not in repr(settings)
    assert Settings.from_env({"GOVGATE_METRICS_TOKEN": ""}).metrics_token == ""
    for bad in ("short-token", "x" * 23, "with a space " * 3, "ünïcode" * 5, "tab\t" * 8):
        with pytest.raises(SettingsError, match="^GOVGATE_METRICS_TOKEN must be at least 24 printable ASCII") as e:
            Settings.from_env({"GOVGATE_METRICS_TOKEN": bad})
        assert bad.strip() not in str(e.value)


def test_an_in_flight_slot_outlives_the_longest_request_the_settings_allow() -> None:
    """A fixed 15-minute TTL let a request allowed to run 20 minutes stop counting against in_flight (h8)."""
    from gateway.components import MIN_IN_FLIGHT_TTL_S, in_flight_ttl_s

    assert in_flight_ttl_s(Settings()) == MIN_IN_FLIGHT_TTL_S == 900
    assert in_flight_ttl_s(Settings(request_timeout_s=1200)) == 1260


def test_policy_evaluators_are_one_to_256() -> None:
    """Each is a process holding the compiled policy: a typo's 2^31 - 1 forked until the machine gave out."""
    _refused("POLICY_EVALUATORS", "257", "must be at most 256$")
    _refused("POLICY_EVALUATORS", "0", "must be at least 1$")
    assert Settings.from_env({"GOVGATE_POLICY_EVALUATORS": "256"}).policy_evaluators == 256


def test_the_timeout_grace_is_a_setting_within_the_in_flight_slot_s_margin() -> None:
    """The 10 s a timed-out request waits for its worker's report was a constant: a large model's prefill (no
    stop between tokens) outlasted it, and the request was charged its whole reservation. Up to 50 s: the
    in-flight slot outlives the request timeout by 60 s, and a request in its grace must keep it."""
    assert Settings.from_env({}).timeout_grace_s == 10.0
    assert Settings.from_env({"GOVGATE_TIMEOUT_GRACE_S": "30"}).timeout_grace_s == 30.0
    _refused("TIMEOUT_GRACE_S", "51", "must be at most 50$")
    _refused("TIMEOUT_GRACE_S", "0", "must be at least 0.1$")


def test_forwarded_allow_ips_takes_addresses_networks_or_any() -> None:
    read = lambda raw: Settings.from_env({"GOVGATE_FORWARDED_ALLOW_IPS": raw}).forwarded_allow_ips  # noqa: E731
    assert read("") == "" and Settings().forwarded_allow_ips == ""  # believes no proxy unless told
    assert read(" 10.0.0.0/8 , 127.0.0.1,::1 ") == "10.0.0.0/8,127.0.0.1,::1"
    assert read("*") == "*"
    for bad in ("localhost", "10.0.0.0/33", "1.2.3.4,", "proxy.internal"):
        with pytest.raises(SettingsError, match="^GOVGATE_FORWARDED_ALLOW_IPS: .* is not an IP address"):
            Settings.from_env({"GOVGATE_FORWARDED_ALLOW_IPS": bad})


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite+pysqlite:///:memory:",
                                 "sqlite:///file::memory:?uri=true", "sqlite:///file:x?mode=memory&uri=true"])
def test_an_in_memory_sqlite_database_is_refused(url: str) -> None:
    """Every process would get its own, empty: a key created there was stored nowhere (probe s56)."""
    with pytest.raises(SettingsError, match="^GOVGATE_DATABASE_URL names an in-memory SQLite database"):
        Settings.from_env({"GOVGATE_DATABASE_URL": url})


@pytest.mark.parametrize("url", ["sqlite:///govgate.db", "sqlite:////var/lib/govgate/govgate.db",
                                 "postgresql+psycopg://u:p@db/govgate", ""])
def test_a_database_that_keeps_its_entries_is_taken(url: str) -> None:
    assert Settings.from_env({"GOVGATE_DATABASE_URL": url}).database_url == url
