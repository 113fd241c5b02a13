"""ClientApp mods: cross-cutting behaviour around every train message.

- ``message_bytes_mod``: measures what the client receives and sends;
- ``fault_injection_mod``: makes the client fail on purpose (``fault-rate``, ``fault-mode``)
  for fault-tolerance studies and tests, keeping the train handler free of it.
"""

from __future__ import annotations

import time
from functools import lru_cache

from flwr.app import ArrayRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fedsparse.config import RunConfig
from fedsparse.faults import draw_fault, hang_seconds, poison
from fedsparse.protocol import ARRAYS_KEY, BYTES_RECEIVED_KEY, BYTES_SENT_KEY, CONFIG_KEY, METRICS_KEY, wire_bytes


@lru_cache(maxsize=4)
def _run_config(items: tuple) -> RunConfig:
    return RunConfig.from_run_config(dict(items))


def run_config_of(context: Context) -> RunConfig:
    """The run's ``RunConfig``, built once per process and run config (a simulation worker
    serves many clients of the same run)."""
    return _run_config(tuple(sorted(context.run_config.items())))


def message_bytes_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Add ``bytes-received`` and ``bytes-sent`` (serialized sizes) to the reply's metrics.

    Like Flower's ``message_size_mod``, but the numbers travel back to the server in the
    reply instead of going to a log. ``bytes-sent`` is measured before the two metrics
    are added (they add a few dozen bytes).
    """
    received = wire_bytes(msg)
    reply = call_next(msg, context)
    if reply.has_error() or METRICS_KEY not in reply.content.metric_records:
        return reply
    sent = wire_bytes(reply)
    metrics = reply.content.metric_records[METRICS_KEY]
    metrics[BYTES_RECEIVED_KEY] = received
    metrics[BYTES_SENT_KEY] = sent
    return reply


class InjectedFault(RuntimeError):
    """What a client that ``fault-rate`` picked to fail raises."""


def _raised(msg: Message, err: Exception) -> Message:
    """The error reply Flower's runtime sends for a ClientApp that raised ``err``
    (same code, same reason format), without the tracebacks it logs for a real one."""
    reason = f"{type(err)}:<'{err}'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def fault_injection_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Fail on purpose when ``(seed, round, partition-id)`` draws under ``fault-rate``.

    ``raise``: answer with the error reply of a ClientApp that raised ``InjectedFault``
    (Flower's runtime builds the same reply for a real exception, but also logs two
    tracebacks per failure, which at 30% of 100 clients drowns the run's output);
    ``nan``: train, then reply with NaN/Inf in every array; ``hang``: sleep past the
    server's ``round-timeout`` (bounded, see ``fedsparse.faults``), then answer the error,
    too late to count. Only train messages are touched; with ``fault-rate`` 0 (the
    default) this is a no-op.
    """
    cfg = run_config_of(context)
    if cfg.fault_rate <= 0 or not msg.metadata.message_type.startswith(MessageType.TRAIN):
        return call_next(msg, context)
    conf = msg.content.config_records.get(CONFIG_KEY)
    server_round = int(conf.get("server-round", 0)) if conf is not None else 0
    partition_id = int(context.node_config.get("partition-id", context.node_config.get("client-id", context.node_id)))
    fault = draw_fault(cfg.seed, server_round, partition_id, cfg.fault_rate, cfg.fault_mode)
    where = f"round {server_round}, partition {partition_id}"
    if fault is None:
        return call_next(msg, context)
    if fault == "raise":
        return _raised(msg, InjectedFault(f"injected fault ({where})"))
    if fault == "hang":
        time.sleep(hang_seconds(cfg.round_timeout))
        return _raised(msg, InjectedFault(f"injected hang ({where}) ended"))
    reply = call_next(msg, context)  # "nan": a client whose training diverged
    if not reply.has_error() and ARRAYS_KEY in reply.content.array_records:
        state = reply.content.array_records[ARRAYS_KEY].to_torch_state_dict()
        reply.content[ARRAYS_KEY] = ArrayRecord(poison(state))
    return reply
