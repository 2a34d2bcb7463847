"""A threading HTTP server on 127.0.0.1 for the transport tests: ``serving(handler)`` yields its port."""
from __future__ import annotations

import contextlib
import http.server
import threading


@contextlib.contextmanager
def serving(handler, wrap=None):
    """A threading HTTP server with ``handler`` on 127.0.0.1 (its socket wrapped by ``wrap``, e.g. TLS); yields its
    port."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if wrap is not None:
        srv.socket = wrap(srv.socket)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
