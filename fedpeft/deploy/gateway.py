"""The coordinator's only network-facing port: Flower's Fleet API (``/v1/fleet/``) and nothing else.

flwr 1.41's SuperLink serves the Fleet API (SuperNodes), the Control API (the ``flwr`` CLI: list,
submit and stop runs) and the Runtime API (its ServerApp) on one host and port, and its open-source
build authenticates no Control API user: anyone holding the federation's CA certificate, which
every site has, could start a run, i.e. ship code that every hospital's SuperNode executes. So
``fedpeft coordinator`` binds the SuperLink to loopback and puts this TLS reverse proxy in front of
it, forwarding only Fleet API calls (node authentication headers untouched, so the SuperLink still
checks them). nginx or caddy would do the same (docs/deploy.md has an nginx block); this one is
written on uvicorn and httpx, which Flower already installs, so a fresh coordinator needs no
system package and the tests can run it.
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx

FLEET_PREFIX = "/v1/fleet/"
# hop-by-hop headers and those httpx/uvicorn set themselves
_DROP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailers",
         b"transfer-encoding", b"upgrade", b"host", b"content-length"}
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def allowed(method: str, path: str) -> bool:
    """Only the Fleet API's POST calls, with no path tricks."""
    return method == "POST" and path.startswith(FLEET_PREFIX) and ".." not in path and "//" not in path \
        and "%" not in path


async def _reply(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*(headers or [(b"content-type", b"application/json")]),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def make_app(upstream: str, ca_cert: str | None) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app forwarding allowed calls to ``upstream`` (the SuperLink on loopback). Its TLS
    certificate is checked against the federation CA; the host name is not (it is 127.0.0.1)."""
    verify: ssl.SSLContext | bool = False
    if ca_cert:
        ctx = ssl.create_default_context(cafile=ca_cert)
        ctx.check_hostname = False
        verify = ctx
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(300.0))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if not allowed(scope["method"], scope["path"]):
            await _reply(send, 404, b'{"detail":"Not Found: this port serves the Fleet API only"}')
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _DROP]
        url = scope["path"] + (f"?{scope['query_string'].decode()}" if scope.get("query_string") else "")
        try:
            res = await client.request(scope["method"], url, headers=headers, content=body)
        except httpx.HTTPError as e:
            await _reply(send, 502, f'{{"detail":"SuperLink unreachable: {type(e).__name__}"}}'.encode())
            return
        out = [(k.encode(), v.encode()) for k, v in res.headers.items() if k.lower().encode() not in _DROP]
        await _reply(send, res.status_code, res.content, out)

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="the SuperLink, e.g. https://127.0.0.1:9093")
    ap.add_argument("--ca-cert", default=None)
    ap.add_argument("--certfile", default=None)
    ap.add_argument("--keyfile", default=None)
    args = ap.parse_args(argv)
    uvicorn.run(make_app(args.upstream, args.ca_cert), host=args.host, port=args.port,
                ssl_certfile=args.certfile, ssl_keyfile=args.keyfile, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
