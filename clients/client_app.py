"""The ClientApp: answer the server's identity query, and run the tasks it sends.

Thin glue around ``fedsparse.engine.client.run_task``: decode the arrays and the per-round
settings of the message, run the task on this node's data, encode the reply. The run's
``RunConfig`` is read once per process (``run_config_of``).
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.mods import fault_injection_mod, message_bytes_mod, run_config_of
from fedsparse.data.partition import NodeData, check_partition_id, node_data
from fedsparse.engine.client import run_task
from fedsparse.processes import exit_without_final_collection, start_time
from fedsparse.profiles import PROFILE_RECORD, Profile, client_profile
from fedsparse.protocol import (ARRAYS_KEY, CLIENT_ID_KEY, CONFIG_KEY, IMPORTS_DONE_KEY, METRICS_KEY,
                                NUM_EXAMPLES_KEY, NUM_PARTITIONS_KEY, OWN_DATA_KEY, PROCESS_START_KEY, REPLY_BUILT_KEY,
                                array_record, torch_state)

exit_without_final_collection()  # a flwr-clientapp process serves one message, then exits
app = ClientApp(mods=[message_bytes_mod, fault_injection_mod])  # faults only with fault-rate > 0


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config, or a one-line error."""
    try:
        return check_partition_id(context.node_config["partition-id"], context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(f"node config lacks {err.args[0]!r}; start the SuperNode with --node-config "
                         "'partition-id=<i> num-partitions=<n>'") from None


def node_of(context: Context) -> NodeData:
    """This node's data: a partition (``partition-id``, ``num-partitions``) or its own images
    (``data-dir``, optional ``client-id``); a bad node config is a one-line error."""
    return node_data(context.node_config)


def node_profile_of(context: Context, node: NodeData) -> Profile | None:
    """This node's device profile: its node config's ``profile`` (with ``profile-<field>``
    overrides), else its share of the run's ``device-profiles`` (simulation), else None; a bad
    node config is a one-line error."""
    return client_profile(run_config_of(context), node.client_id, context.node_config)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is (its partition, or the ``client-id`` of a
    node with its own data), so that rounds pair data, subnets and seeds by that id, not by
    Flower's node ids. A node with its own data and no ``client-id`` names no id (the server
    then knows it by its node id) and says ``own-data``."""
    node = node_of(context)
    values = {NUM_PARTITIONS_KEY: node.num_partitions}
    if node.client_id is not None:
        values[CLIENT_ID_KEY] = node.client_id
    if node.data_dir:
        values[OWN_DATA_KEY] = 1
    content = RecordDict({METRICS_KEY: MetricRecord(values)})
    profile = node_profile_of(context, node)
    if profile is not None:  # the server sizes this node's slice, steps and batch to it
        content[PROFILE_RECORD] = ConfigRecord(profile.to_dict())
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the task; the reply's metrics carry the client's side of the round's timeline
    (``fedsparse.accounting.timeline``): process start, imports done (this handler runs),
    features ready and training done (``run_task``), reply built."""
    imports_done = time.time()
    cfg = run_config_of(context)
    node = node_of(context)
    arrays = torch_state(msg.content[ARRAYS_KEY])
    trained, num_examples, metrics = run_task(cfg, node.client_id, node.num_partitions, arrays,
                                              dict(msg.content[CONFIG_KEY]), data_dir=node.data_dir,
                                              profile=node_profile_of(context, node))
    stamps = {IMPORTS_DONE_KEY: imports_done}
    started = start_time()
    if started is not None and started <= imports_done:
        stamps[PROCESS_START_KEY] = started
    record = array_record(trained)
    metrics = MetricRecord({NUM_EXAMPLES_KEY: num_examples, **metrics, **stamps, REPLY_BUILT_KEY: time.time()})
    return Message(content=RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics}), reply_to=msg)
