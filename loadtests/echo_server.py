"""The HTTP floor of the serving benchmark: uvicorn and a bare ASGI app that reads each request
body and answers a fixed small JSON, with no model, no framework and no decoding. What it costs
per request is what any Python HTTP server costs before it does any work.

    python -m loadtests.echo_server [--port 8002]
"""

from __future__ import annotations

import argparse

ANSWER = (b'{"head":"session","session_id":"s","version":1,"predictions":[{"label":"1","index":1,'
          b'"score":0.9,"top_k":[{"label":"1","index":1,"score":0.9}]}],"applied":null}')
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        msg = await receive()
        more = msg.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8002)
    args = p.parse_args(argv)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
