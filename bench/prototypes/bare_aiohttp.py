"""Reference point: a bare aiohttp proxy (low-level server, one ClientSession), no features.

    python bench/prototypes/bare_aiohttp.py LISTEN_PORT UPSTREAM_PORT

The issue's reference machine measured such a prototype at 0.10x the nginx proxy;
bench/floor.py measures it here, in the same run as nginx.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web

HOP = frozenset({"connection", "host", "content-length", "transfer-encoding", "keep-alive"})


async def main(port: int, upstream: int) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )

    async def handler(request: web.BaseRequest) -> web.Response:
        body = await request.read() if request.body_exists else None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
        url = f"http://127.0.0.1:{upstream}{request.raw_path}"
        async with session.request(request.method, url, headers=headers, data=body) as r:
            answer = web.Response(status=r.status, body=await r.read())
            for k, v in r.headers.items():
                if k.lower() not in HOP:
                    answer.headers[k] = v
        return answer

    loop = asyncio.get_running_loop()
    await loop.create_server(web.Server(handler), "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
