"""`simsearch serve --workers N`: N server processes answering on one listening socket.

One process answers "similar" requests from one core at a time (the GIL, and uvicorn's one event loop). Workers let a
machine with more cores answer more at once: each is a fresh interpreter (multiprocessing's spawn, so no FAISS or
ONNX Runtime thread pool crosses a fork) that makes its own app over the db (`create_app`) and serves the socket the
parent bound; the kernel gives each new connection to one of them. They read the db side by side: LMDB serves many
reader processes, the pages the OS maps (the store, a memory-mapped index) are shared, and each worker holds its own
model session and follows a running `simsearch index` by itself (library.py).

The parent only supervises. It reports the first worker that cannot start (one error, the others stopped), says when
all of them serve, starts a new worker when one dies, and stops them all on Ctrl-C or SIGTERM. A worker stops by
itself when the parent is gone (the pipe between them closes), so no worker outlives a killed parent.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

import lmdb

from simsearch.errors import SimsearchError
from simsearch.server.app import create_app, run
from simsearch.server.library import ServerConfig

log = logging.getLogger(__name__)

STOP_SECONDS = 10.0  # a worker still running this long after SIGTERM is killed


def _worker(config: ServerConfig, sock: socket.socket, pipe: Connection, setup: Callable[[], None] | None) -> None:
    """A worker process: its app over the db, then serving `sock` until SIGTERM or the parent's end of `pipe` closes.
    Sends ("ready", "") once it serves, or ("error", one line) when its app cannot be made."""
    if setup is not None:
        setup()
    try:
        app = create_app(config)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent stops the others
        return
    except SimsearchError as e:
        pipe.send(("error", str(e)))
        return
    except lmdb.Error as e:  # as `simsearch` says it for any command
        pipe.send(("error", f"the db's LMDB store is damaged ({e}): see `simsearch check`"))
        return
    except BaseException as e:
        pipe.send(("error", f"a server worker failed to start ({type(e).__name__}: {e})"))
        raise
    pipe.send(("ready", ""))

    def exit_with_parent() -> None:
        try:
            pipe.recv()  # the parent never sends: this returns when its end closes
        except (EOFError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful stop

    threading.Thread(target=exit_with_parent, name="parent-watch", daemon=True).start()
    run(app, sock)


class Workers:
    """N worker processes over one listening socket (module docstring)."""

    def __init__(self, config: ServerConfig, sock: socket.socket, count: int, setup: Callable[[], None] | None = None):
        self.config, self.sock, self.count, self.setup = config, sock, count, setup
        self.context = multiprocessing.get_context("spawn")
        self.running: list[tuple[multiprocessing.Process, Connection]] = []

    def _start(self) -> tuple[multiprocessing.Process, Connection]:
        ours, theirs = self.context.Pipe()
        process = self.context.Process(target=_worker, args=(self.config, self.sock, theirs, self.setup),
                                       name="simsearch-serve-worker")
        process.start()
        theirs.close()
        return process, ours

    @staticmethod
    def _started(process: multiprocessing.Process, pipe: Connection) -> None:
        """Wait until the worker serves; SimsearchError with its reason when it cannot."""
        try:
            kind, text = pipe.recv()
        except (EOFError, OSError):
            process.join()
            kind, text = "error", f"a server worker exited with code {process.exitcode} before it served"
        if kind != "ready":
            raise SimsearchError(text)

    def serve(self, ready: Callable[[], None]) -> None:
        """Start the workers, call `ready` once all serve, and keep them serving until Ctrl-C or SIGTERM (then
        return); SimsearchError (all stopped) when a worker cannot start."""
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            self.running = [self._start() for _ in range(self.count)]
            for process, pipe in self.running:
                self._started(process, pipe)
            ready()
            while True:
                ended = set(wait([process.sentinel for process, _ in self.running]))
                for i, (process, pipe) in enumerate(self.running):
                    if process.sentinel in ended:
                        process.join()
                        pipe.close()
                        log.warning("server worker %d exited with code %s: starting another", process.pid,
                                    process.exitcode)
                        self.running[i] = self._start()
                        self._started(*self.running[i])
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.stop()

    def stop(self) -> None:
        for process, _ in self.running:
            if process.is_alive():
                process.terminate()
        for process, pipe in self.running:
            process.join(STOP_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()
            pipe.close()
        self.running = []


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the workers as Ctrl-C does
