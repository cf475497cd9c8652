"""A worker that stops the way many servers and small scripts do: on SIGTERM it exits at
once, cutting the connections in its hands; only SIGINT makes it stop accepting, finish what
it accepted, and exit. Each answer comes after DELAY, so it always holds some.

It serves its slot's socket (fd 3, socket activation) and answers as the demo worker does
(`slot=S pid=P cpu=0 on=0`), so the tests' client can read it."""
import os
import select
import signal
import socket
import threading
import time

DELAY = float(os.environ.get("DELAY", "0.1"))
SLOT = os.environ.get("BALANCER_SLOT", "0")
stopping = threading.Event()


def answer(conn):
    with conn:
        conn.settimeout(10)
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                return
            request += chunk
        time.sleep(DELAY)
        body = ("slot=%s pid=%d cpu=0 on=0\n" % (SLOT, os.getpid())).encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )


def main():
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    listener = socket.socket(fileno=3)
    # Non-blocking on the shared socket: the slot's other worker may take a connection first.
    listener.setblocking(False)
    handlers = []
    while not stopping.is_set():
        ready, _, _ = select.select([listener], [], [], 0.05)
        if not ready:
            continue
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            continue
        conn.setblocking(True)
        t = threading.Thread(target=answer, args=(conn,))
        t.start()
        handlers.append(t)
    for t in handlers:
        t.join()


main()
