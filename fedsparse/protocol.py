"""What server and clients say to each other: record keys, and the size of what they send.

Keys are defined once here and used by the strategies, the ClientApp and the tests.
``wire_bytes`` is the only Flower-aware function in the library (imported lazily), shared
by both sides so that "bytes down" on the server and "bytes received" on a client are the
same measure.
"""

from __future__ import annotations

from typing import Any

ARRAYS_KEY = "arrays"  # ArrayRecord: the (sub-)model
CONFIG_KEY = "config"  # ConfigRecord: round, local-steps, lr, batch-size, subnet
METRICS_KEY = "metrics"  # MetricRecord in replies
NUM_EXAMPLES_KEY = "num-examples"
TRAIN_LOSS_KEY = "train-loss"
BYTES_RECEIVED_KEY = "bytes-received"
BYTES_SENT_KEY = "bytes-sent"
PEAK_RSS_KEY = "peak-rss-bytes"
TENSOR_BYTES_KEY = "train-tensor-bytes"
EXTRACT_SECONDS_KEY = "extract-seconds"
CACHE_HIT_KEY = "feature-cache-hit"
TRAIN_SECONDS_KEY = "train-seconds"
CLIENT_TASK_KEY = "client-task"  # what a client does with a task (fedsparse.algorithms.base)
CLIENT_ID_KEY = "partition-id"  # a query reply: who the node is
NUM_PARTITIONS_KEY = "num-partitions"
OWN_DATA_KEY = "own-data"  # a query reply: 1 for a node that trains on its own images (node config data-dir)


def wire_bytes(obj: Any) -> int:
    """Serialized size of a Flower ``Message``, ``RecordDict`` or record.

    The sum of the deflated inflatable objects that Flower's transport pushes and pulls
    (array chunks with their ``.npy`` headers, record and message headers), without HTTP
    or TLS framing.
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())
