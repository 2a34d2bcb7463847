"""The TLS client-certificate refusal probe, shared by the enrollment transports.

Under TLS 1.3 a server judges our client certificate after our side of the handshake is done, and one that
refuses it and closes at once can lose its alert: our request then meets a closed or reset connection, which
looks like a dropped connection. After such an early close (``closed_early``) with a client certificate
presented, one probe (``probe``) tells a refusal from a drop: a new connection, the handshake, and no request; a
server that accepted the certificate waits for the request, one that refuses it sends its alert or closes.
With no client certificate presented, both transports probe such a close too, for TLS 1.3's certificate_required
alert (116), which a server requiring a certificate sends after our request was written and can lose the same way;
then only an alert counts. Only a connection's first request is probed: a kept connection has passed the handshake
and served a request, so its close is a drop (an idle timeout), retried without a probe.
``refusal_message`` is the error text of a refusal without an alert, one shape for every protocol.
``in_daemon_thread`` runs the blocking probe off the event loop in a daemon thread, so a cancelled caller never
waits for it (nor does the interpreter's exit); ``settle`` hands a worker thread's outcome to the awaiting task
(also the CMP HTTP transport's).
"""
from __future__ import annotations

REFUSAL_PROBE_S = 2.0  # how long the refusal probe waits for a server to close a connection it was sent nothing on


def closed_early(e: BaseException) -> bool:
    """Did the server end the connection before answering (EOF or reset), as a refusing TLS 1.3 server does?"""
    import http.client
    import ssl

    return isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError,
                          ConnectionAbortedError, http.client.RemoteDisconnected))


def probe(conn, wait_s: float):
    """The refusal probe, blocking, on ``conn``: a new, not yet connected connection with ``connect()`` (TCP, a
    proxy's CONNECT, the TLS handshake with our client certificate), ``sock`` and ``close()`` (as
    ``http.client.HTTPSConnection``); it is closed here. None if the server accepts the certificate (it waits
    ``wait_s`` for a request) or cannot be asked now (a drop or an outage: the caller retries as before), else its
    alert (``ssl.SSLError``) or what ended the connection (``str``)."""
    import ssl

    try:
        try:
            conn.connect()
        except ssl.SSLCertVerificationError:
            return None  # the server's certificate: the retry reports it
        except ssl.SSLError as e:
            return e if "ALERT" in (e.reason or "") else None
        except OSError:
            return None
        conn.sock.settimeout(wait_s)
        try:
            data = conn.sock.recv(1)
        except TimeoutError:
            return None  # it waits for our request: it accepted the certificate
        except ssl.SSLError as e:
            return e if "ALERT" in (e.reason or "") else f"{type(e).__name__}: {e}"
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        return "connection closed" if data == b"" else None
    finally:
        conn.close()


def refusal_message(what: str, server: str, subject: str, error: BaseException, refusal: str) -> str:
    """The error text of a likely refusal: ``what`` the request (``POST <url>``), ``server`` the protocol's name
    (``CMP``, ``EST``), ``subject`` our certificate's subject, ``error`` the request's early close, ``refusal``
    what ended the probe's connection."""
    return (f"{what}: the {server} server probably refused our TLS client certificate {subject!r}: it ended the "
            f"connection right after the TLS handshake in which we sent it, without an answer ({type(error).__name__}"
            f": {error or 'connection closed'}), and ended a second connection the same way before we sent anything "
            f"({refusal}); under TLS 1.3 a server that refuses a client certificate can close before its alert is "
            "read. Check that the certificate is issued by a CA the server trusts for TLS clients and still valid")


def settle(done, result, error) -> None:
    """Hand a worker thread's outcome to the future ``done`` its caller awaits (call it on the loop's thread, by
    ``call_soon_threadsafe``): ``error``, if not None, is raised there, else ``result`` returned; nothing if
    ``done`` is settled already (cancelled, or timed out)."""
    if done.done():
        return
    if error is None:
        done.set_result(result)
    else:
        done.set_exception(error)


async def in_daemon_thread(fn, *args, name: str = "devagent-tls-probe"):
    """``fn(*args)`` in a daemon thread, awaited: a cancelled caller returns at once and never waits for it."""
    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def worker():
        try:
            result, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting task
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, done, result, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=worker, name=name, daemon=True).start()
    return await done
