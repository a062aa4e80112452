"""A warm ClientApp executor for a SuperNode started with ``--isolation process``.

By default a Flower 1.41 SuperNode (``--isolation subprocess``) starts ``flower-superexec``, which
starts a fresh ``flwr-clientapp`` process for **every message**: Python, torch, transformers, peft and
Opacus are imported again, the FAB is unpacked, the base model is loaded and the user's examples are
run through the frozen lower blocks again, each stage of each round. Measured on 2 CPU cores with the
tiny test model: 29-37 s a round for two devices, nearly all of it process start-up.

With ``--isolation process`` the SuperNode starts nothing: it waits for an external executor to
acquire tasks from its Runtime API (``AcquireTask`` -> token -> ``PullTaskInput`` ... ``PushTaskOutput``,
the same protocol ``flwr-clientapp`` speaks). This module is that executor, as one long-lived process:
it imports the ClientApp once, and the ClientApp's per-process caches (base model, adapters, the
device's cached lower-block activations: ``fedpersona.client.app._DEVICES``) stay resident between messages
and rounds. Device state still goes to the encrypted state folder before every reply, so killing
this process loses nothing but the cache.

Trust: the worker runs the ClientApp **installed on the device** (``fedpersona.client.app:app`` of the installed
fedpersona), not code from the run's FAB. A task whose FAB id or version differs from the installed
app is refused with an error reply. The server therefore cannot push new code to a device; upgrading
is the device owner's ``pip install``.

Start it next to the SuperNode (``fedpersona supernode`` does both), e.g.::

    flower-supernode --isolation process --port 9094 ... &
    python -m fedpersona.client.worker --runtime-api-address 127.0.0.1:9094
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from fedpersona.flower_patches import shorten_pull_backoff

logger = logging.getLogger(__name__)

APP_REF = "fedpersona.client.app:app"
FAB_ID = "fedpersona/fedpersona"
_POLL_ENV = "FEDPERSONA_WORKER_POLL"


def installed_version() -> str:
    """Version of the installed fedpersona (package metadata, else the source tree's pyproject.toml)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("fedpersona")
    except PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        with pyproject.open("rb") as fh:
            return str(tomllib.load(fh)["project"]["version"])


class Worker:
    """Acquire ClientApp tasks from a SuperNode's Runtime API and run them in this process."""

    def __init__(
        self,
        runtime_api_address: str,
        *,
        root_certificates: str | None = None,
        app_ref: str = APP_REF,
        poll_interval: float = 0.1,
        check_fab: bool = True,
    ) -> None:
        self.address = runtime_api_address
        self.root_certificates = root_certificates
        self.app_ref = app_ref
        self.poll_interval = poll_interval
        self.check_fab = check_fab
        self.version = installed_version()
        self.tasks_done = 0
        self._stop = threading.Event()
        self._app = None

    # -------------------------------------------------------------------------- setup
    def _client(self, *interceptors, max_time: float | None = 60.0):
        """A Runtime API client. Its retries give up after ``max_time`` seconds and never signal this
        process (Flower's own invoker SIGINTs the process on HTTP 401, which would end a warm worker)."""
        import httpx
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import RetryInvoker, exponential
        from flwr.supercore.runtime import RuntimeHttpClient

        invoker = RetryInvoker(
            wait_gen_factory=lambda: exponential(max_delay=5), recoverable_exceptions=(httpx.TransportError,),
            max_tries=None if max_time else 1, max_time=max_time,
        )
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.root_certificates is None,
            root_certificates=self.root_certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors],
            retry_invoker=invoker,
        )

    def load_app(self):
        """Import the ClientApp once (torch, transformers, peft, Opacus with it)."""
        if self._app is None:
            t0 = time.perf_counter()
            module, _, attr = self.app_ref.partition(":")
            self._app = getattr(importlib.import_module(module), attr)
            logger.info("loaded ClientApp %s (fedpersona %s) in %.1f s", self.app_ref, self.version,
                        time.perf_counter() - t0)
        return self._app

    def _load_into(self, failed: list) -> None:
        try:
            self.load_app()
        except BaseException as exc:  # pylint: disable=broad-exception-caught
            failed.append(exc)

    def stop(self) -> None:
        self._stop.set()

    # ---------------------------------------------------------------------------- loop
    def serve(self, *, max_tasks: int | None = None, alive=None) -> None:
        """Poll for tasks until :meth:`stop`, ``max_tasks`` tasks, or ``alive()`` turns false."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
        from flwr.supercore.constant import TaskType

        # Import the ClientApp (seconds) in the background, so a SuperNode that fails to start is noticed.
        failed: list[BaseException] = []
        loader = threading.Thread(target=lambda: self._load_into(failed), daemon=True)
        loader.start()
        while loader.is_alive():
            if alive is not None and not alive():
                return
            loader.join(0.2)
        if failed:
            raise failed[0]
        client = self._client(max_time=None)
        logger.info("warm worker polling the SuperNode Runtime API at %s every %.2f s", self.address,
                    self.poll_interval)
        try:
            while not self._stop.is_set() and (alive is None or alive()):
                try:
                    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                except Exception as exc:  # the SuperNode restarting, say: keep polling
                    logger.debug("AcquireTask failed: %s", exc)
                    self._stop.wait(1.0)
                    continue
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                    self.tasks_done += 1
                    if max_tasks is not None and self.tasks_done >= max_tasks:
                        return
                    continue
                self._stop.wait(self.poll_interval)
        finally:
            client.close()

    def run_task(self, token: str) -> None:
        """One message, as ``flwr-clientapp`` handles it, without leaving the process."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
        from flwr.supernode.runtime import run_clientapp
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=no-name-in-module

        # The SuperNode hands out a task before it has fetched the message's objects from the
        # SuperLink; a warm worker asks at once, so Flower's 1-10 s retry backoff would cost seconds.
        shorten_pull_backoff(run_clientapp, "pull_and_inflate_object_from_tree")

        client = self._client(RuntimeTokenHttpInterceptor(token))

        def heartbeat() -> bool:
            # Flower's version raises SIGINT in the process when the task is gone (run stopped);
            # here that would kill the warm process, so only log it: the reply is then dropped.
            try:
                if not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                    logger.warning("task heartbeat refused (run stopped?)")
            except Exception:  # transport errors: retried by HeartbeatSender
                return False
            return True

        beat = HeartbeatSender(heartbeat)
        beat.start()
        message = context = reply = None
        t_app = t_pull = t_push = 0.0
        status, details = SubStatus.FAILED, "ClientApp task failed"
        t0 = time.perf_counter()
        try:
            try:
                message, context, run, _fab = pull_task_input(client)
                t_pull = time.perf_counter() - t0
                logger.info("%s task acquired (run %s, round %s)", message.metadata.message_type,
                            message.metadata.run_id, message.metadata.group_id or "-")
                if self.check_fab and (run.fab_id != FAB_ID or run.fab_version != self.version):
                    raise PermissionError(
                        f"this device runs its installed {FAB_ID} {self.version}; the run asks for "
                        f"{run.fab_id or '?'} {run.fab_version or '?'}: refused (update the device, or run "
                        f"the matching version)"
                    )
                t_app = time.perf_counter()
                reply = self.load_app()(message=message, context=context)
                t_app = time.perf_counter() - t_app
                status, details = SubStatus.COMPLETED, ""
            except Exception as exc:  # pylint: disable=broad-exception-caught
                logger.exception("task failed")
                details = f"{type(exc).__name__}: {exc}"
                if message is not None:
                    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                                    reply_to=message)
            # Reached unless this process is being stopped (SystemExit / KeyboardInterrupt): then the
            # SuperNode's token expiry answers the message with an error, as for a crashed ClientApp.
            bytes_in = _content_bytes(message)
            bytes_out = _content_bytes(reply)
            t_push = time.perf_counter()
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # pylint: disable=broad-exception-caught
                logger.exception("failed to push the reply")
            push_task_output(client=client, context=context, sub_status=status, details=details)
            t_push = time.perf_counter() - t_push
        finally:
            beat.stop()
            client.close()
        kind = message.metadata.message_type if message is not None else "?"
        logger.info("%s task done in %.2f s (ClientApp %.2f s, %s); message bytes in %d out %d; pull %.2f s, push %.2f s",
                    kind, time.perf_counter() - t0, t_app, status, bytes_in, bytes_out, t_pull, t_push)


def _content_bytes(message) -> int:
    """Serialized size of a message's content objects (what travels, before TLS and HTTP framing)."""
    if message is None:
        return 0
    try:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
    except Exception:  # pylint: disable=broad-exception-caught
        return -1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedpersona.client.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                   help="the SuperNode's Runtime API (its --host:--port; default 127.0.0.1:9094)")
    p.add_argument("--root-certificates", default=None,
                   help="CA of the Runtime API's TLS certificate (when the SuperNode has --ssl-certfile)")
    p.add_argument("--poll-interval", type=float, default=float(os.environ.get(_POLL_ENV, "0.1")))
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    from fedpersona.output import configure

    configure(logging.DEBUG if args.verbose else logging.INFO)  # one handler: each line once, no ANSI codes
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    for var, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    worker = Worker(args.runtime_api_address, root_certificates=args.root_certificates,
                    poll_interval=args.poll_interval)

    def _term(signum, _frame):
        raise SystemExit(128 + signum)  # state is written atomically: stopping mid-task loses nothing

    signal.signal(signal.SIGTERM, _term)
    try:
        worker.serve()
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
