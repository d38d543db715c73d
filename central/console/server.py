"""Serving the console: uvicorn on its own thread, inside the receiver or on its own.

``wardpost receiver run`` starts it when ``[console] enabled = true`` (commands
then go out over the receiver's MQTT connection and each committed batch wakes
the live updates at once); ``wardpost console run`` serves it from the same
store in a process of its own (with its own MQTT connection for commands, and
live updates from polling the store).
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from central.alarms import Commander
from central.config import ReceiverConfig
from central.console.app import Console
from central.store import Store, open_store

log = logging.getLogger("wardpost.console")


class ConsoleServer:
    """A :class:`Console` and the uvicorn server in front of it."""

    def __init__(
        self,
        config: ReceiverConfig,
        commander: Commander | None,
        store: Store | None = None,
        *,
        port: int | None = None,
        live_interval: float = 0.5,
    ):
        self.config = config
        # Its own connection: page reads never wait behind the receiver's writer.
        self.store = store if store is not None else open_store(config.store)
        self._own_store = store is None
        self.console = Console(config, self.store, commander, live_interval=live_interval)
        settings = config.console
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.console.app,
                host=settings.host,
                port=settings.port if port is None else port,
                ssl_certfile=settings.tls_cert_file or None,
                ssl_keyfile=settings.tls_key_file or None,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=2,
                lifespan="off",
            )
        )
        self._thread = threading.Thread(target=self.server.run, name="console-http", daemon=True)

    @property
    def port(self) -> int:
        sockets = self.server.servers[0].sockets if self.server.servers else []
        return int(sockets[0].getsockname()[1]) if sockets else self.config.console.port

    @property
    def url(self) -> str:
        scheme = "https" if self.config.console.tls else "http"
        return f"{scheme}://{self.config.console.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ConsoleServer:
        self.console.start()
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the console could not listen on {self.config.console.host}:"
                    f"{self.config.console.port}"
                )
            time.sleep(0.02)
        log.info("console at %s", self.url)
        return self

    def stop(self) -> None:
        self.console.stop()  # ends the event streams first, so uvicorn can close
        self.server.should_exit = True
        self._thread.join(timeout=10)
        if self._own_store:
            self.store.close()
