"""The stock Triton client against fwserve: the Open Inference Protocol only, binary tensors,
over HTTP (default) or gRPC (``--grpc``, with ``fwserve serve --grpc-port 8001``).

    pip install 'tritonclient[http,grpc]'
    python examples/tritonclient_infer.py --url 127.0.0.1:8000
    python examples/tritonclient_infer.py --grpc --url 127.0.0.1:8001

It reads the server and model metadata, classifies digits with the base head, then adapts a
session test-then-train with a ``label`` input tensor (the outputs are the predictions made
before the update) and classifies again with the session's head. The session is created over
/v1 (the protocol has no call for it), at --http-url.
"""

from __future__ import annotations

import argparse
import uuid

import httpx
import numpy as np

from models.data import NOVEL_CLASSES, mnist_splits

MODEL = "fwserve-mnist-vit"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="127.0.0.1:8000", help="host:port of the HTTP (or, with --grpc, gRPC) port")
    ap.add_argument("--http-url", default=None, help="fwserve's HTTP base URL for creating the session "
                    "(default: http://--url; with --grpc: http://127.0.0.1:8000)")
    ap.add_argument("--grpc", action="store_true")
    ap.add_argument("--model", default=MODEL)
    args = ap.parse_args(argv)
    if args.grpc:
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    http_url = args.http_url or ("http://127.0.0.1:8000" if args.grpc else f"http://{args.url}")

    _, held = mnist_splits()
    novel = held.subset(NOVEL_CLASSES)
    pick = np.random.default_rng(1).permutation(len(novel.labels))
    images = novel.images[pick].astype(np.uint8)
    labels = np.array([str(y).encode() for y in novel.labels[pick]], dtype=np.object_)

    client = tc.InferenceServerClient(args.url)
    meta = client.get_server_metadata() if not args.grpc else client.get_server_metadata(as_json=True)
    print(f"server {meta['name']} {meta['version']}, extensions {meta['extensions']}")
    print("model ready:", client.is_model_ready(args.model))

    def infer(batch, session_id=None, label=None):
        x = tc.InferInput("image", list(batch.shape), "UINT8")
        x.set_data_from_numpy(batch)  # binary tensor data
        inputs = [x]
        if label is not None:
            y = tc.InferInput("label", [len(label)], "BYTES")
            y.set_data_from_numpy(label)
            inputs.append(y)
        return client.infer(args.model, inputs, parameters={"session_id": session_id} if session_id else None)

    base = infer(images[:5])
    print("base head (digits 0-4 only):", [v.decode() for v in base.as_numpy("label")])

    sid = f"triton-{uuid.uuid4().hex[:8]}"
    r = httpx.post(f"{http_url}/v1/sessions", json={"rule": "prototype", "id": sid,
                                                   "classes": [str(c) for c in NOVEL_CLASSES]}, timeout=30)
    r.raise_for_status()
    try:
        adapted = infer(images[5:30], sid, labels[5:30])  # test-then-train
        correct = adapted.as_numpy("correct")
        params = adapted.get_response()["parameters"] if not args.grpc else \
            {k: v.int64_param for k, v in adapted.get_response().parameters.items() if k != "session_id"}
        print(f"adapted on 25 labelled digits: session version {params['session_version']}, "
              f"{int(correct.sum())}/25 right before each update")
        after = infer(images[30:60], sid)
        got = [v.decode() for v in after.as_numpy("label")]
        want = [v.decode() for v in labels[30:60]]
        print(f"session head on 30 new digits: {sum(g == w for g, w in zip(got, want))}/30 right")
    finally:
        httpx.delete(f"{http_url}/v1/sessions/{sid}", timeout=30)
    client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
