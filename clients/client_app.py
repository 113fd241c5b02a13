"""The ClientApp: answer the server's identity query, and run the tasks it sends.

Thin glue around ``fedsparse.engine.client.run_task``: decode the arrays and the per-round
settings of the message, run the task on this node's data, encode the reply. The run's
``RunConfig`` is read once per process (``run_config_of``).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.mods import fault_injection_mod, message_bytes_mod, run_config_of
from fedsparse.data.partition import check_partition_id
from fedsparse.engine.client import run_task
from fedsparse.protocol import ARRAYS_KEY, CLIENT_ID_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, NUM_PARTITIONS_KEY

app = ClientApp(mods=[message_bytes_mod, fault_injection_mod])  # faults only with fault-rate > 0


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config, or a one-line error."""
    try:
        return check_partition_id(context.node_config["partition-id"], context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(f"node config lacks {err.args[0]!r}; start the SuperNode with --node-config "
                         "'partition-id=<i> num-partitions=<n>'") from None


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is (its partition), so that rounds pair
    data, subnets and seeds by partition, not by Flower's node ids."""
    pid, n = node_partition(context)
    return Message(RecordDict({METRICS_KEY: MetricRecord({CLIENT_ID_KEY: pid, NUM_PARTITIONS_KEY: n})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = run_config_of(context)
    pid, n = node_partition(context)
    arrays = msg.content[ARRAYS_KEY].to_torch_state_dict()
    trained, num_examples, metrics = run_task(cfg, pid, n, arrays, dict(msg.content[CONFIG_KEY]))
    content = RecordDict({ARRAYS_KEY: ArrayRecord(trained),
                          METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: num_examples, **metrics})})
    return Message(content=content, reply_to=msg)
