"""The ClientApp: extract (cached) masked features, train the slice it was sent, reply.

The client is the same for IST and FedAvg: it builds an MLP of whatever shape the
received arrays have (an IST slice or the full head), trains ``local-steps`` Adam steps
on its partition's cached CLS features, and sends the arrays back with its metrics.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.mods import fault_injection_mod, message_bytes_mod
from fedsparse.accounting import head_train_tensor_bytes, peak_rss_bytes
from fedsparse.config import RunConfig
from fedsparse.head import state_dims
from fedsparse.protocol import (
    ARRAYS_KEY,
    CACHE_HIT_KEY,
    CONFIG_KEY,
    EXTRACT_SECONDS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PEAK_RSS_KEY,
    TENSOR_BYTES_KEY,
    TRAIN_LOSS_KEY,
    TRAIN_SECONDS_KEY,
)
from fedsparse.task import client_features, train_slice

app = ClientApp(mods=[message_bytes_mod, fault_injection_mod])  # faults only with fault-rate > 0


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(f"node config lacks {err.args[0]!r}; start the SuperNode with --node-config "
                         "'partition-id=<i> num-partitions=<n>'") from None


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(context.run_config)
    partition_id, num_partitions = _partition(context)
    conf: ConfigRecord = msg.content[CONFIG_KEY]
    server_round = int(conf.get("server-round", 0))
    feats = client_features(cfg, partition_id, num_partitions, server_round)

    state = msg.content[ARRAYS_KEY].to_torch_state_dict()
    batch_size = int(conf.get("batch-size", cfg.batch_size))
    t0 = time.perf_counter()
    trained, loss = train_slice(cfg, state, feats, server_round, partition_id, steps=int(conf.get("local-steps", cfg.local_steps)),
                                batch_size=batch_size, lr=float(conf.get("lr", cfg.lr)))
    train_seconds = time.perf_counter() - t0

    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: len(feats.y),
            TRAIN_LOSS_KEY: loss,
            TRAIN_SECONDS_KEY: train_seconds,
            EXTRACT_SECONDS_KEY: feats.seconds,
            CACHE_HIT_KEY: int(feats.cache_hit),
            PEAK_RSS_KEY: peak_rss_bytes(),
            TENSOR_BYTES_KEY: head_train_tensor_bytes(state_dims(state), batch_size),
        }
    )
    content = RecordDict({ARRAYS_KEY: ArrayRecord(trained), METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)
