"""The web server behind a reverse proxy: whose X-Forwarded-Proto is believed ([web]
trusted_proxies), and Strict-Transport-Security on what arrived over https."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn
from conftest import free_port
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.serve import web_server_config
from dicomnode.web.app import create_app


def _forwarded_https(sessions: sessionmaker[Session], trusted: list[str]) -> httpx.Headers:
    """The response headers of /healthz asked over plain http through a "proxy" on this host
    that says the client came over https, with ``trusted`` as [web] trusted_proxies."""
    settings = Settings(web={"host": "127.0.0.1", "port": free_port(), "trusted_proxies": trusted})
    config = web_server_config(create_app(sessions), settings)
    config.lifespan = "off"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        url = f"http://127.0.0.1:{settings.web.port}/healthz"
        plain = httpx.get(url, timeout=10)
        assert plain.status_code == 200
        assert "strict-transport-security" not in plain.headers
        return httpx.get(url, headers={"X-Forwarded-Proto": "https"}, timeout=10).headers
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize(
    "trusted, believed",
    [(["127.0.0.1"], True), (["127.0.0.0/8"], True), (["192.0.2.10"], False)],
)
def test_only_a_trusted_proxy_makes_a_request_https(
    sessions: sessionmaker[Session], trusted: list[str], believed: bool
) -> None:
    headers = _forwarded_https(sessions, trusted)
    assert ("strict-transport-security" in headers) == believed, headers
    if believed:
        assert headers["strict-transport-security"] == "max-age=31536000"
