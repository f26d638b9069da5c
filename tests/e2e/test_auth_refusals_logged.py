"""A served gateway logs every refused key, by reason, key id and client, and never the presented secret.

``govgate serve`` runs as its own process with its default logging (no
access log), so the lines this test reads are what an operator would have.
"""

from __future__ import annotations

import httpx

from gateway.auth import KeyStore
from gateway.components import open_database
from tests.conftest import bearer, serving


def _refusals(log_text: str) -> list[str]:
    return [line for line in log_text.splitlines() if "govgate.auth" in line and "key refused" in line]


def test_refused_keys_are_logged_without_their_secrets(settings, tmp_path):
    own = settings.with_(database_url=f"sqlite:///{tmp_path / 'keys.db'}", access_log=False)
    store = KeyStore(open_database(own))
    live = store.create("lena", team="research", roles=["viewer"]).secret
    revoked = store.create("rolf", team="research", roles=["viewer"])
    store.revoke(revoked.key.key_id)
    store.engine.dispose()
    live_id = live.split("_")[1]
    guessed = live[:-6] + "AAAAAA"  # the live key's id, a wrong secret
    foreign = "sk-" + "x7" * 20  # another service's secret pasted by mistake
    log = tmp_path / "serve.log"
    with serving(own, log) as base:
        def status(headers: dict[str, str]) -> int:
            return httpx.get(f"{base}/v1/models", headers=headers, timeout=30).status_code

        assert status(bearer(live)) == 200
        assert status(bearer(guessed)) == 401
        assert status(bearer(revoked.secret)) == 401
        assert status(bearer(foreign)) == 401
        assert status({}) == 401
        assert status({"Authorization": f"Basic {live}"}) == 401
    text = log.read_text()
    lines = _refusals(text)
    assert len(lines) == 5, lines
    assert any("unknown_or_revoked" in line and live_id in line for line in lines)
    assert any("unknown_or_revoked" in line and revoked.key.key_id in line for line in lines)
    assert any("not_a_key" in line for line in lines)
    assert any("(missing)" in line for line in lines)
    assert any("malformed_header" in line for line in lines)
    assert all("127.0.0.1" in line for line in lines)
    for secret in (live, guessed, revoked.secret, foreign):
        # The secret part follows "gk_<key id>_" and may itself hold "_" (token_urlsafe).
        tail = secret.split("_", 2)[2] if secret.startswith("gk_") else secret
        assert tail not in text, "a presented secret reached the log"


def test_forwarded_headers_are_believed_only_from_the_proxies_named(settings, tmp_path):
    """uvicorn believes ``X-Forwarded-For`` from 127.0.0.1 by default: every client of a gateway on loopback chose
    the address its refused key was logged under (probe s56). Now only ``GOVGATE_FORWARDED_ALLOW_IPS``'s."""
    own = settings.with_(database_url=f"sqlite:///{tmp_path / 'keys.db'}", access_log=False)
    KeyStore(open_database(own)).engine.dispose()
    spoof = {"Authorization": "Bearer gk_8842e1298b25_" + "A" * 43, "X-Forwarded-For": "6.6.6.6",
             "X-Forwarded-Proto": "https"}
    for trusted, blamed in (("", "127.0.0.1"), ("127.0.0.1", "6.6.6.6")):
        log = tmp_path / f"serve-{trusted or 'none'}.log"
        with serving(own.with_(forwarded_allow_ips=trusted), log) as base:
            assert httpx.get(f"{base}/v1/models", headers=spoof, timeout=30).status_code == 401
            sign_in = httpx.get(f"{base}/console/sign-in", headers={"X-Forwarded-Proto": "https"}, timeout=30)
        [line] = _refusals(log.read_text())
        assert line.endswith(f"client {blamed}"), line
        cookies = sign_in.headers.get_list("set-cookie")
        assert cookies and all(("; secure" in c.lower()) == bool(trusted) for c in cookies), cookies
