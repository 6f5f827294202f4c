"""Helpers for the `edgemoe serve` tests: a real uvicorn server on a free loopback port (in a
thread, or the CLI in a subprocess), raw HTTP for requests no client library would send, and a
copy of a GGUF with a chat template added."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn


@contextlib.contextmanager
def server_thread(app):
    """Serve `app` with uvicorn on 127.0.0.1 (a port the OS picks); yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(*args: str, env: dict | None = None):
    """`edgemoe serve ARGS` in a subprocess on a free port; yields (base URL, Popen)."""
    port = free_port()
    cmd = [sys.executable, "-m", "edgemoe.cli", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"edgemoe serve exited {proc.returncode}: {proc.stdout.read()}")
            with contextlib.suppress(OSError):
                if request(base, "GET", "/health")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("edgemoe serve did not answer /health in time")
            time.sleep(0.2)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def request(base: str, method: str, path: str, body: bytes | dict | None = None,
            headers: dict | None = None, chunked: bool = False, timeout_s: float = 60) -> tuple[int, dict, dict]:
    """(status, JSON body or {}, headers) of one raw HTTP request."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout_s)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"content-type": "application/json", **(headers or {})}
    try:
        if chunked:
            conn.request(method, path, body=iter([data[i:i + 65536] for i in range(0, len(data), 65536)]),
                         headers=hdrs, encode_chunked=True)
        else:
            conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {"_text": raw.decode("utf-8", "replace")}
        return resp.status, parsed, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def metrics(base: str, headers: dict | None = None) -> dict[str, float]:
    """GET /metrics parsed: 'name{labels}' -> value."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("GET", "/metrics", headers=headers or {})
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        assert resp.getheader("content-type").startswith("text/plain")
        text = resp.read().decode()
    finally:
        conn.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def with_chat_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of GGUF `src` with `tokenizer.chat_template` set (tensors copied byte for byte)."""
    from gguf import GGUFValueType

    from edgemoe.gguf_file import GGUFFile
    from edgemoe.gguf_rewrite import KV, rewrite, same_tensors

    model = GGUFFile(src)
    rewrite(model, dst, same_tensors(model), {"tokenizer.chat_template": KV(template, GGUFValueType.STRING)})
    return dst
