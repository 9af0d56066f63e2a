"""The resident device worker: one long-lived process per device that holds the quantized base, the owner's
tokenized text and the personal store, and is Flower's task executor for its SuperNode.

`fedpeft client` runs the SuperNode with `--isolation process`: the SuperNode then starts nothing, and
whatever claims its tasks on its Runtime API runs them. This process does, in a loop: AcquireTask (signed
with the SuperExec secret only the store's owner can read), pull the task's message and context, run our
ClientApp here, with the base already loaded, and push the reply and the context back (Flower's own
`push_message` / `push_task_output`, and their pull_task_input without the FAB). No SuperExec, no ClientApp process per message:
flwr's default `subprocess` mode cost each message a fresh process (~1.2 s, ~125 MiB) and a device two
base loads a round before this worker existed (flwrlabs/flower#3670 asks for persistent apps).

The device runs only the fedpeft installed here: a task of another app or version is refused with an error
reply, and the FAB the server ships is never installed or imported. Secure aggregation's state lives in
Flower's context (in the SuperNode between messages), so a worker that dies mid-round loses nothing of
the protocol: `fedpeft client` restarts it, and the new worker answers the task the old one held with an
error reply (the round counts the device as a dropout of that stage) instead of leaving the server to wait
for Flower's 60 s heartbeat expiry.

    python -m fedpeft.device.worker STORE HOST:PORT   # STORE holds node-config.toml and the secret
"""

from __future__ import annotations

import base64
import functools
import importlib.metadata
import json
import logging
import os
import signal
import sys
import threading
import time
import tomllib
import traceback
from pathlib import Path
from typing import Any

from fedpeft.atomic import atomic_write_bytes
from fedpeft.config.node import DeviceConfig
from fedpeft.device import tasks
from fedpeft.device.supernode import Backoff
from fedpeft.errors import FedpeftError
from fedpeft.log import quiet_libraries, setup_console
from fedpeft.processes import PeakPss

log = logging.getLogger("fedpeft")

SECRET_FILE = "superexec.secret"  # signs AcquireTask: only the store's owner can claim this device's tasks
LOADS_FILE = "base-loads"  # one line per base load since `fedpeft client` started (reported as base_loads)
IN_FLIGHT_FILE = "task-in-flight.json"  # the task being run: its token and message, for a restarted worker
PUBLISHER = "fedpeft"  # pyproject.toml [tool.flwr.app] publisher: runs of our app are fedpeft/fedpeft
# after a task, look for the next one often (a secure round's stages follow each other within a second);
# back off to the SuperExec's own default poll when idle
POLL = Backoff(0.05, 1.0)


def read_node(store: Path) -> DeviceConfig:
    try:
        data = tomllib.loads((store / "node-config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise FedpeftError(f"cannot read {store / 'node-config.toml'}: {e}") from None
    node = DeviceConfig.from_node_config(data)
    if node is None:
        raise FedpeftError(
            f"{store / 'node-config.toml'} has no data-path; start the device with `fedpeft client`"
        )
    return node


@functools.cache
def _mine() -> str:
    return importlib.metadata.version("fedpeft")  # read once: it cannot change under a running worker


def foreign(fab_id: str, fab_version: str) -> str | None:
    """Why a run of app `fab_id` at `fab_version` is refused here (None: it is ours, this version)."""
    mine = _mine()
    if fab_id == f"{PUBLISHER}/fedpeft" and fab_version == mine:
        return None
    return (
        f"refused: this device runs fedpeft {mine} only; the task belongs to a run of "
        f"{fab_id or '?'} {fab_version or '?'}"
    )


def _count_loads(store: Path) -> int:
    try:
        return len((store / LOADS_FILE).read_text().splitlines())
    except OSError:
        return 0


class Executor:
    """Claims this device's tasks on its SuperNode's Runtime API and runs them (see the module's docstring)."""

    def __init__(self, store: Path, address: str) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        self.store, self.address = store, address
        try:
            secret = (store / SECRET_FILE).read_bytes()
        except OSError as e:
            raise FedpeftError(
                f"cannot read {store / SECRET_FILE}: {e.strerror}; start `fedpeft client`"
            ) from None
        self.claims = RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=True,  # loopback only: the SuperNode binds its Runtime API to 127.0.0.1
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}
                ),
            ],
            retry_invoker=_retries(None),  # the SuperNode may be restarting: wait for it
        )
        self.request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])

    def task_client(self, token: str, patience: float = 60.0) -> Any:
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=_retries(patience),
        )

    def acquire(self) -> str | None:
        """A pending task's token, or None when there is none."""
        res = self.claims.AcquireTask(self.request)
        return res.token if res.HasField("task") and res.token else None

    def run_task(self, token: str) -> None:
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        from fedpeft.flower.client_app import app

        client = self.task_client(token)
        heartbeat = HeartbeatSender(_heartbeat_fn(client))
        heartbeat.start()
        context, status, details = None, SubStatus.FAILED, "the device worker failed"
        try:
            message, context, run = pull_task_input(client)
            self._remember(token, message)
            refusal = foreign(run.fab_id, run.fab_version)
            if refusal is not None:
                print(f"fedpeft: error: {refusal}", file=sys.stderr, flush=True)
                reply, details = (
                    Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, refusal), reply_to=message),
                    refusal,
                )
            else:
                try:
                    reply = app(message=message, context=context)
                    status, details = SubStatus.COMPLETED, ""
                except Exception as e:  # a bug: the traceback to the device's log, one line to the server
                    traceback.print_exc()
                    details = f"device worker failed: {type(e).__name__}: {e}"[:500]
                    reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, details), reply_to=message)
            push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=status, details=details)
            heartbeat.stop()
            client.close()
            (self.store / IN_FLIGHT_FILE).unlink(missing_ok=True)

    def _remember(self, token: str, message: Any) -> None:
        """Keep the task's token and message (without content) until it is answered: a worker restarted
        after a crash answers it (answer_orphan)."""
        from flwr.app.message import remove_content_from_message
        from flwr.common.serde import message_to_proto

        proto = message_to_proto(remove_content_from_message(message)).SerializeToString()
        record = {"token": token, "message": base64.b64encode(proto).decode()}
        atomic_write_bytes(self.store / IN_FLIGHT_FILE, json.dumps(record).encode())

    def answer_orphan(self) -> None:
        """The task a previous worker held when it died: an error reply now, so the server counts this
        device as a dropout at once. Nothing to do when there was none, or its token already expired
        (Flower then replied for it)."""
        from flwr.app import Context, Error, Message, RecordDict
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.common.serde import message_from_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        path = self.store / IN_FLIGHT_FILE
        try:
            record = json.loads(path.read_text())
            message = message_from_proto(ProtoMessage.FromString(base64.b64decode(record["message"])))
            token = str(record["token"])
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)
            return
        reason = "the device worker stopped during this task (it has been restarted)"
        meta = message.metadata  # push_message reads only the run and node of its context
        where = Context(meta.run_id, meta.dst_node_id, node_config={}, state=RecordDict(), run_config={})
        client = self.task_client(token, patience=5.0)
        try:
            push_message(
                client, Message(Error(ErrorCode.CLIENT_APP_CRASHED, reason), reply_to=message), where
            )
            push_task_output(client=client, context=None, sub_status=SubStatus.FAILED, details=reason)
            log.warning("answered the task the previous worker held with an error reply (a dropout)")
        except Exception as e:  # expired: Flower has answered it itself
            log.info("the previous worker's task is no longer open (%s)", type(e).__name__)
        finally:
            client.close()
            path.unlink(missing_ok=True)


def _retries(patience: float | None) -> Any:
    """Flower's HTTP retry policy for the Runtime API (flwr/supercore/retry/http_retry.py: transport errors
    and 502/503/504 retried with an exponential back-off) without its answer to a 401, which sends SIGINT to
    the whole process: right for a ClientApp process that ends with its task, fatal to a worker holding its
    base. Here a refused request fails that task alone. `patience`: seconds before giving up (None: never)."""
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    def give_up(e: Exception) -> bool:
        return isinstance(e, httpx.HTTPStatusError) and e.response.status_code not in (502, 503, 504)

    return RetryInvoker(
        lambda: exponential(max_delay=5.0),
        (httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=patience,
        should_giveup=give_up,
    )


def pull_task_input(client: Any) -> tuple[Any, Any, Any]:
    """The task's message, context and run: Flower's pull_task_input (flwr/supernode/runtime/run_clientapp.py)
    without the FAB (this device runs its own fedpeft, never code the server ships) and with a short first
    retry for the message's objects. The SuperNode offers the task as soon as it has the message, while its
    objects may still be arriving from the SuperLink; Flower's first retry is 1 s, doubling."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.device.supernode import OBJECT_RETRY, OBJECT_RETRY_CAP

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id = res.task_id, res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run = context_from_proto(res.context), run_from_proto(res.run)
    messages = client.PullMessages(PullAppMessagesRequest())
    if not messages.messages_list:
        raise FedpeftError("the SuperNode offered a task without a message")
    node = Node(node_id=context.node_id)
    tree = messages.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=OBJECT_RETRY,
        backoff_cap=OBJECT_RETRY_CAP,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's: the id is not in the object
    return message, context, run


def _heartbeat_fn(client: Any) -> Any:
    """Flower's task heartbeat, without its reaction to a refused one (SIGINT to the whole process, which
    would cost this worker its loaded base): the task's own push then fails, and the loop goes on."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            if not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                log.warning("the SuperNode no longer holds this task open; its reply will be dropped")
        except httpx.HTTPError:
            return False  # Flower's sender retries with a back-off
        return True

    return beat


def _watch_parent(parent: int) -> None:
    """Exit when `fedpeft client` is gone (even killed -9): the worker must not outlive its device."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def serve(store: Path, address: str) -> None:
    # torch: imported after the store and node config are checked, so a refusal is quick
    from fedpeft.device import runtime as device

    read_node(store)  # the ClientApp reads it from its context (the SuperNode's node config) per task
    executor = Executor(store, address)
    sampler = PeakPss(os.getppid())  # the device's whole tree, sampled while a task runs
    tasks.STATS.update(root_pid=os.getppid(), loads_before=_count_loads(store), pss=sampler)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    executor.answer_orphan()
    log.info("device worker %d running this device's tasks from %s", os.getpid(), address)
    loads = 0
    while True:
        try:
            token = executor.acquire()
            if token is None:
                time.sleep(POLL.next())
                continue
            POLL.reset()
            with sampler.active():
                executor.run_task(token)
        except (
            Exception
        ) as e:  # the SuperNode restarting, a run stopped mid-task: the next task is unaffected
            log.warning("a task could not be claimed or answered: %s: %s", type(e).__name__, str(e)[:300])
            time.sleep(1.0)
        if device.BASE_LOADS[0] > loads:  # counted across restarts for the round's base_loads
            with open(store / LOADS_FILE, "a") as f:
                f.write(f"{time.time():.0f} {os.getpid()}\n" * (device.BASE_LOADS[0] - loads))
            loads = device.BASE_LOADS[0]


def main(argv: list[str]) -> int:
    setup_console()
    quiet_libraries()
    if len(argv) != 2:
        print("usage: python -m fedpeft.device.worker STORE HOST:PORT", file=sys.stderr)
        return 2
    try:
        serve(Path(argv[0]).resolve(), argv[1])
    except FedpeftError as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
