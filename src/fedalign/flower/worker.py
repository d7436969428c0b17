"""A warm ClientApp executor for deployed SuperNodes: one long-lived process runs every task.

A Flower 1.41 SuperNode in its default isolation (``--isolation subprocess``) starts
``flower-superexec``, which launches a fresh ``flwr-clientapp`` process for **every**
message: the process imports torch, rebuilds the model and prepares (prefix-caches) the
partition before it trains, then exits. Started with ``--isolation process``, the SuperNode
leaves launching to an executor outside it; :func:`serve_clientapp_tasks` is such an
executor that launches nothing. It asks the SuperNode's Runtime API for pending ClientApp
tasks (``AcquireTask``, as ``flower-superexec`` does) and runs each one in its own process,
doing what ``flwr-clientapp`` does (pull the message, context, run and FAB; call the
ClientApp; push the reply and the updated context), so the ClientApp's process-level cache
(:func:`fedalign.flower.client_app.client_runtime`: model, partition rows, prefix cache)
serves the 2nd and later messages.

Differences from ``flwr-clientapp``: tasks run one after another in this process (a
SuperNode hands out one ClientApp task at a time anyway); the FAB is installed and the app
loaded once per FAB hash; no runtime dependency installation (the app runs in this
process's environment); a message object the SuperNode does not hold yet is asked for
again after 0.02 s instead of 1 s (:func:`pull_task_input`); idle, it asks for a task after
0.05 s, doubling up to 0.25 s; a task whose run was stopped finishes and its push is
refused (logged), instead of the process being interrupted. An exception in the ClientApp becomes
an error reply, as in ``flwr-clientapp``; the executor keeps serving.

The Runtime API and ``AcquireTask`` are Flower's internal interfaces between a SuperNode
and its executors (tested with flwr 1.41, pinned ``>=1.41,<1.43``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.logger import log
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

DEFAULT_POLL_INTERVAL = 0.05
"""First wait (s) after an ``AcquireTask`` call found no task (``flower-superexec``: 1.0
between all calls)."""
DEFAULT_MAX_POLL_INTERVAL = 0.25
"""Longest such wait (s), reached by doubling; back to the first after a task. Each call
costs the SuperNode about 3 ms of CPU: at a fixed 0.05 s three idle pairs of SuperNode and
worker took 0.4 of a core."""
PULL_INITIAL_BACKOFF = 0.02
"""First wait (s) before asking again for a message object the SuperNode does not hold yet
(Flower's default: 1 s, doubling)."""
PULL_BACKOFF_CAP = 0.2
"""Longest such wait (s) (Flower's default: 10 s)."""


@dataclass
class TaskOutcome:
    """One task this executor ran.

    Parameters
    ----------
    task_id : int
    run_id : int
    message_type : str
        ``train``, ``evaluate``, ``query``... (empty when the task failed before its
        message arrived).
    seconds : float
        From acquiring the task to pushing its output.
    phases : dict of str to float
        Seconds spent pulling the input (``pull``), in the ClientApp (``app``) and pushing
        the reply and context (``push``).
    completed : bool
        False when the ClientApp (or pulling its input) raised.
    details : str
        Why it failed (empty when completed).
    """

    task_id: int
    run_id: int
    message_type: str
    seconds: float
    completed: bool
    details: str = ""
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class _Apps:
    """ClientApps loaded in this process, by FAB hash (installed and imported once)."""

    loaded: dict[str, ClientApp] = field(default_factory=dict)

    def get(self, fab_id: str, fab_version: str, fab_hash: str, content: bytes) -> ClientApp:
        app = self.loaded.get(fab_hash)
        if app is None:
            install_from_fab(content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            app = load(fab_id, fab_version, fab_hash)
            self.loaded[fab_hash] = app
        return app


def _client(
    address: str, insecure: bool, certificates: bytes | None, component: str, token: str = ""
) -> RuntimeHttpClient:
    interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=interceptors,  # type: ignore[arg-type]
        retry_invoker=make_simple_http_retry_invoker(),
    )


def _heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """A task heartbeat that reports failure instead of interrupting the process."""
    request = SendTaskHeartbeatRequest()

    def send() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(request).success)
        except httpx.HTTPError:
            return False

    return send


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """The task's message, context, run and FAB, as ``flwr-clientapp`` pulls them, but
    asking again for a missing message object after 0.02 s (doubling up to 0.2 s).

    A SuperNode creates the task (which the executor acquires at once) before it has pulled
    the message's objects from the SuperLink; with Flower's backoff (1 s, then 2 s, ...) the
    first ask for an object that is still on its way cost a second a message.
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=PULL_INITIAL_BACKOFF,
        backoff_cap=PULL_BACKOFF_CAP,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as flwr-clientapp does
    return message, context, run, fab


def run_task(
    address: str,
    token: str,
    *,
    insecure: bool,
    certificates: bytes | None,
    apps: _Apps,
    task_id: int = 0,
    run_id: int = 0,
) -> TaskOutcome:
    """Run one acquired ClientApp task in this process, as ``flwr-clientapp`` would.

    Parameters
    ----------
    address : str
        The SuperNode's Runtime API (``flower-supernode --port``, default 127.0.0.1:9094).
    token : str
        The task's token from ``AcquireTask``.
    insecure : bool
        Plain HTTP to the Runtime API (it listens on 127.0.0.1 by default).
    certificates : bytes or None
        PEM root certificates when the Runtime API uses TLS.
    apps : _Apps
        The ClientApps loaded so far (updated).
    task_id, run_id : int, default 0
        For the outcome and the log.
    """
    started = time.perf_counter()
    client = _client(address, insecure, certificates, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(_heartbeat(client))
    heartbeat.start()
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    status, details, message_type = SubStatus.FAILED, "ClientApp task failed", ""
    phases: dict[str, float] = {}
    mark = time.perf_counter()
    try:
        message, context, run, fab = pull_task_input(client)
        phases["pull"] = time.perf_counter() - mark
        message_type = message.metadata.message_type
        mark = time.perf_counter()
        app = apps.get(run.fab_id, run.fab_version, fab.hash_str, fab.content)
        reply = app(message=message, context=context)
        phases["app"] = time.perf_counter() - mark
        status, details = SubStatus.COMPLETED, ""
    except Exception as error:  # the executor outlives a failing task, as SuperExec does
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = f"{type(error)}:<'{error}'>"
        if isinstance(error, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            reason = "An exception was raised when attempting to load `ClientApp`"
        log(ERROR, "ClientApp raised an exception", exc_info=error)
        details = reason
        if message is not None:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
    finally:
        mark = time.perf_counter()
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=details)
        except Exception as error:  # a stopped run refuses the push; keep serving
            log(ERROR, "Failed to push the output of task %d", task_id, exc_info=error)
            status = SubStatus.FAILED
        phases["push"] = time.perf_counter() - mark
        heartbeat.stop()
        client.close()
    return TaskOutcome(
        task_id=task_id,
        run_id=run_id,
        message_type=message_type,
        seconds=time.perf_counter() - started,
        completed=status == SubStatus.COMPLETED,
        details=details,
        phases=phases,
    )


def serve_clientapp_tasks(
    runtime_api_address: str,
    *,
    insecure: bool = True,
    root_certificates: bytes | None = None,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
    max_tasks: int | None = None,
    stop: threading.Event | None = None,
    on_task: Callable[[TaskOutcome], None] | None = None,
) -> list[TaskOutcome]:
    """Acquire the SuperNode's ClientApp tasks and run them in this process until stopped.

    Parameters
    ----------
    runtime_api_address : str
        ``host:port`` of the SuperNode's Runtime API (its ``--port``; default
        ``127.0.0.1:9094``). The SuperNode must run with ``--isolation process``.
    insecure : bool, default True
        Plain HTTP to the Runtime API (local to the SuperNode's machine).
    root_certificates : bytes or None, default None
        PEM root certificates when the SuperNode serves its Runtime API with TLS
        (``flower-supernode --ssl-certfile``); then ``insecure`` must be False.
    poll_interval : float, default 0.05
        Seconds to wait after an ``AcquireTask`` call found no task; doubled after each
        further empty call up to ``max_poll_interval``, and back to this after a task.
    max_poll_interval : float, default 0.25
        The longest wait (raised to ``poll_interval`` when smaller).
    max_tasks : int or None, default None
        Return after this many tasks (None: until ``stop`` is set or the process ends).
    stop : threading.Event or None, default None
        Set it to return after the current task.
    on_task : callable or None, default None
        Called with each :class:`TaskOutcome`.

    Returns
    -------
    list of TaskOutcome
        The tasks run, in order.

    Raises
    ------
    ValueError
        For ``insecure`` with ``root_certificates``, or a poll interval <= 0.
    """
    if insecure and root_certificates is not None:
        raise ValueError("insecure=True and root_certificates are mutually exclusive")
    if not poll_interval > 0:
        raise ValueError(f"poll_interval must be > 0 (got {poll_interval})")
    stop = stop or threading.Event()
    max_poll_interval = max(max_poll_interval, poll_interval)
    wait = poll_interval
    apps = _Apps()
    outcomes: list[TaskOutcome] = []
    client = _client(runtime_api_address, insecure, root_certificates, "SuperExec")
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    log(INFO, "Warm ClientApp executor on the Runtime API at %s", runtime_api_address)
    try:
        while not stop.is_set() and (max_tasks is None or len(outcomes) < max_tasks):
            acquired = client.AcquireTask(request)
            if not (acquired.HasField("task") and acquired.token):
                stop.wait(wait)
                wait = min(2 * wait, max_poll_interval)
                continue
            wait = poll_interval
            task = acquired.task
            if task.type != TaskType.CLIENT_APP.value:
                log(WARNING, "Skipping task %d of type %s", task.task_id, task.type)
                continue
            outcome = run_task(
                runtime_api_address,
                acquired.token,
                insecure=insecure,
                certificates=root_certificates,
                apps=apps,
                task_id=task.task_id,
                run_id=task.run_id,
            )
            outcomes.append(outcome)
            log(
                INFO,
                "task %d (run %d, %s): %s in %.2f s (%s)",
                outcome.task_id,
                outcome.run_id,
                outcome.message_type or "?",
                "done" if outcome.completed else f"failed ({outcome.details})",
                outcome.seconds,
                ", ".join(f"{k} {v:.2f} s" for k, v in outcome.phases.items()),
            )
            if on_task is not None:
                on_task(outcome)
    finally:
        client.close()
    return outcomes
