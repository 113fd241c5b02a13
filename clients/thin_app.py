"""The ClientApp Flower loads (``pyproject.toml``: ``clients.thin_app:app``): it imports no torch.

Without ``client-worker`` in the node config it hands each message to the full ClientApp
(``clients.client_app``, imported on the first message: torch, fedsparse) in this process, as
before. With ``client-worker = true`` it forwards the message to the node's long-lived worker
(``clients.worker``), which keeps the full ClientApp loaded, and returns the worker's reply with
this process's timeline stamps (process start, imports done); if the worker dies mid-message it
handles the message here and logs one line.
"""

from __future__ import annotations

import sys
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import worker
from fedsparse.processes import exit_without_final_collection

exit_without_final_collection()  # a flwr-clientapp process serves one message, then exits
app = ClientApp()


def full_app(msg: Message, context: Context) -> Message:
    from clients.client_app import app as full  # torch and fedsparse: only on this path

    return full(msg, context)


def forward(msg: Message, context: Context, handler_start: float) -> Message:
    """The worker's reply to ``msg``; this process handles it when the worker dies first."""
    try:
        reply, state = worker.exchange(msg, context)
    except worker.WorkerLost as err:
        print(f"fedsparse: client worker of node {context.node_id} lost ({err}); handling this message "
              "in the ClientApp process", file=sys.stderr, flush=True)
        return full_app(msg, context)
    context.state = state
    stamp(reply, handler_start)
    return reply


def stamp(reply: Message, handler_start: float) -> None:
    """This process's start and its handler's start as the reply's process-start and imports-done
    stamps (the worker's own are its long-lived process's)."""
    from fedsparse.processes import start_time
    from fedsparse.protocol import IMPORTS_DONE_KEY, METRICS_KEY, PROCESS_START_KEY

    if reply.has_error() or METRICS_KEY not in reply.content.metric_records:
        return
    metrics = reply.content.metric_records[METRICS_KEY]
    if IMPORTS_DONE_KEY not in metrics:  # an identity query: no timeline
        return
    metrics[IMPORTS_DONE_KEY] = handler_start
    started = start_time()
    if started is not None and started <= handler_start:
        metrics[PROCESS_START_KEY] = started
    else:
        metrics.pop(PROCESS_START_KEY, None)


def handle(msg: Message, context: Context) -> Message:
    handler_start = time.time()
    if worker.worker_enabled(context.node_config):
        return forward(msg, context, handler_start)
    return full_app(msg, context)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    return handle(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle(msg, context)
