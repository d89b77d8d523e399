"""The temporary Prefect server that `loraflow` commands run their flows on when no PREFECT_API_URL is set.

Prefect starts one by itself on the first API call (its "ephemeral" server, a uvicorn subprocess) and stops
it at interpreter exit. Two things go wrong with that when a run is stopped by a signal: the server is in
this process's group, so Ctrl-C in a terminal (or SIGTERM to the group) stops it at the same moment, before
this process has recorded the crashed task and flow runs and sent its last log lines, which it then retries
against a server that is gone, for minutes; and SIGTERM alone ends this process without running its exit
hooks (Prefect re-raises it with the default handler once the run is marked Crashed), leaving the server
running as an orphan. `temporary_server` starts the same server in a process group of its own
(loraflow/processes.py), registered where Prefect looks for its ephemeral server, and at the end sends the
queued logs and events first, then stops it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import prefect
from prefect.events.worker import EventsWorker
from prefect.logging.configuration import ensure_logging_setup
from prefect.logging.handlers import APILogWorker
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, get_current_settings

from loraflow.processes import start_in_own_group, stop_group

DRAIN_SECONDS = 10.0  # at most this long to send the queued logs and events before the server stops


class TemporaryServer(SubprocessASGIServer):
    """Prefect's ephemeral server, started in its own process group and stopped as a group.

    `start_early` starts it without waiting: the server boots (about 7 s on 2 cores) while the command
    imports its flows (torch, transformers: longer), and Prefect's first API call, which calls `start`,
    waits for it to answer."""

    _early: subprocess.Popen | None = None
    _booting: threading.Thread | None = None
    _boot_error: BaseException | None = None

    def start_early(self) -> None:
        """Start the server process here and wait for it to answer in a background thread."""
        self.port = self.find_available_port()
        self._early = self._server_command()  # in this thread: no fork from the waiting one

        def boot() -> None:
            try:
                super(TemporaryServer, self).start()
            except BaseException as e:  # re-raised by `start`, in the thread that needs the server
                self._boot_error = e

        self._booting = threading.Thread(target=boot, name="prefect-server-start", daemon=True)
        self._booting.start()

    def start(self, timeout: int | None = None) -> None:
        booting, self._booting = self._booting, None
        if booting is not None:
            booting.join()
        if self._boot_error is not None:
            error, self._boot_error = self._boot_error, None
            raise error
        super().start(timeout)  # nothing to do once it answers

    def _run_uvicorn_command(self) -> subprocess.Popen:
        early, self._early = self._early, None
        return early or self._server_command()

    def _server_command(self) -> subprocess.Popen:
        # The command and environment of SubprocessASGIServer._run_uvicorn_command (prefect 3.9).
        return start_in_own_group(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            },
        )

    def stop(self) -> None:
        for process in (self.server_process, self._early):  # _early: stopped before it was waited for
            if process is not None:
                stop_group(process)
        self._early = None
        super().stop()  # forgets the process and the instance


def send_queued_logs_and_events(timeout: float = DRAIN_SECONDS) -> None:
    """Wait (at most `timeout` s each) until Prefect's log and event workers have sent what they hold."""
    APILogWorker.drain_all(timeout=timeout)
    EventsWorker.drain_all(timeout=timeout)


@contextmanager
def temporary_server() -> Iterator[TemporaryServer | None]:
    """Run the body with a temporary server that Prefect takes for its own ephemeral one (None, and nothing
    started, when PREFECT_API_URL names a server); then send what Prefect has queued for it and stop it."""
    if PREFECT_API_URL.value():
        yield None
        return
    ensure_logging_setup()  # as importing the flows would: the server's start is logged
    server = TemporaryServer()  # SubprocessASGIServer() now returns this instance: Prefect starts no other
    try:
        server.start_early()
        yield server
    finally:
        try:
            send_queued_logs_and_events()
        finally:
            server.stop()
