"""No connection is reset because a server closed it while its client's pool still held it.

Each hop's server keeps an idle connection longer than its client's pool does (KEEP_ALIVE_S,
UPSTREAM_KEEPALIVE_S). With uvicorn's old default of 5 s, a connection left idle just past 5 s was
closed by the server, and the client's next request on it died with a reset or a disconnect.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest

from tests.integration.conftest import Fleet

pytestmark = pytest.mark.integration

OLD_KEEP_ALIVE_S = 5.0  # uvicorn's default, which pod servers and the router used to run with
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def _post(conn: http.client.HTTPConnection) -> int:
    conn.request("POST", "/v1/chat/completions", json.dumps(CHAT), {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


def test_idle_connections_outlive_the_old_keep_alive(fleet: Fleet) -> None:
    # One connection straight to the pod server, one to the router (whose own pooled connection to
    # the pod then also sits idle for the same time).
    conns = [
        http.client.HTTPConnection(url.removeprefix("http://"), timeout=60) for url in (fleet.pod_url, fleet.router_url)
    ]
    try:
        assert [_post(c) for c in conns] == [200, 200]
        socks = [c.sock for c in conns]
        # Idle time is what is under test here, not a synchronisation: the connections must stay idle.
        time.sleep(OLD_KEEP_ALIVE_S + 1.0)
        assert [_post(c) for c in conns] == [200, 200]  # a closed connection raises here instead
        assert [c.sock for c in conns] == socks, "the same connections were reused"
    finally:
        for c in conns:
            c.close()
