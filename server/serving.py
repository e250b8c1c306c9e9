"""Run the HTTP app under uvicorn so that a stop signal fits a container's stop grace period.

On SIGTERM uvicorn stops accepting connections, then waits for the requests in flight before it
runs the app's shutdown, and a device's long poll lasts up to 20 s. So the signal itself answers
every waiting long poll (VersionBoard.close); the app's shutdown then stops the worker and closes
the store. Torch-free: API replicas run through here too.
"""
from __future__ import annotations

import threading
from typing import Any

import uvicorn
from fastapi import FastAPI

GRACEFUL_SHUTDOWN_S = 10.0  # a request still running after this is cancelled (the stop grace period is 30 s)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        parts = getattr(self._app.state, "parts", None)
        if parts is not None:  # in a thread: the board's lock may be held by the code this signal interrupted
            threading.Thread(target=parts.board.close, name="end-long-polls", daemon=True).start()
        super().handle_exit(sig, frame)


def serve(app: FastAPI, **config: Any) -> None:
    """uvicorn.run(app, **config), with long polls answered as soon as a stop signal arrives."""
    config.setdefault("timeout_graceful_shutdown", GRACEFUL_SHUTDOWN_S)
    _Server(uvicorn.Config(app, **config), app).run()
