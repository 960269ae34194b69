"""A scriptable HTTP server on 127.0.0.1 for the download tests (fixture ``server`` in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import http.server
import re
import threading
from collections.abc import Iterator


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` with Range support; ``scripts[path]`` lists behaviours for the next requests.

    Behaviours: "ok", an HTTP status code, "cut", "ignore_range", "redirect:<location>"
    (a 302) and "disposition" (the file with a Content-Disposition naming ``../`` paths).
    """

    files: dict[str, bytes]
    scripts: dict[str, list[str]]
    requests: list[tuple[str, str | None]]

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self.requests.append((self.path, self.headers.get("Range")))
        behaviour = self.scripts.get(self.path, []).pop(0) if self.scripts.get(self.path) else "ok"
        if behaviour.isdigit():
            self.send_error(int(behaviour))
            return
        if behaviour.startswith("redirect:"):
            self.send_response(302)
            self.send_header("Location", behaviour.removeprefix("redirect:"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path not in self.files:
            self.send_error(404)
            return
        body, start = self.files[self.path], 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and behaviour != "ignore_range":
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        if behaviour == "disposition":
            self.send_header(
                "Content-Disposition",
                "attachment; filename=\"../../escaped.nii.gz\"; filename*=UTF-8''..%2F..%2Fescaped.nii.gz",
            )
        self.end_headers()
        payload = body[start:]
        if behaviour == "cut":  # promise everything, send half, hang up
            payload = payload[: len(payload) // 2]
            self.close_connection = True
        self.wfile.write(payload)


@contextlib.contextmanager
def serve(files: dict[str, bytes] | None = None) -> Iterator[tuple[str, type[Handler]]]:
    """A fresh threaded server for the ``with`` block; yields (base URL, handler class with files/scripts/requests)."""
    handler = type("H", (Handler,), {"files": dict(files or {}), "scripts": {}, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
