"""The fedbits ClientApp: relays each request to the node's worker (or serves it here).

Flower starts a fresh process for every message, so this module imports no torch:
with ``fedbits-worker = true`` in the node config (what ``fedbits flower supernode``
sets) it hands the downlink to the node's long-lived worker and returns the worker's
uplink. Without a worker (a plain ``flower-supernode``) it builds the node's session
in this process, which reloads the model every message but gives the same bytes.

Node configuration errors (no ``partition-id``, an unusable directory) and malformed
requests come back as the reply's error text, which the server records as the
client's rejection reason.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedbits.errors import FedbitsError
from fedbits.logs import configure
from fedbits.runtime.flower import worker
from fedbits.runtime.flower.protocol import (
    CONFIG_KEY,
    WORKER_KEY,
    NodeReply,
    Request,
    node_dir,
    node_partition,
)

app = ClientApp()


def _serve(op: str, msg: Message, context: Context) -> Message:
    partition = -1
    try:
        partition = node_partition(context.node_config)
        root = node_dir(context.node_config)
        config_text = context.run_config.get(CONFIG_KEY)
        if not isinstance(config_text, str):
            raise FedbitsError(f"the run config has no {CONFIG_KEY!r}: not a fedbits app")
        request = Request.from_content(msg.content)
        if context.node_config.get(WORKER_KEY) is True:
            reply = worker.call(root, op, config_text, partition, request)
        else:
            from fedbits.runtime.flower.node import NodeHost

            configure()  # the node's progress lines, in this process's (the SuperNode's) log
            reply = NodeHost(root).handle(op, config_text, partition, request)
    except FedbitsError as e:
        reply = NodeReply(error=str(e), partition=partition)
    return Message(reply.to_content(), reply_to=msg)


@app.query()
def prepare(msg: Message, context: Context) -> Message:
    """Say which partition this node serves, after getting the run's model ready."""
    return _serve("prepare", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the method's client half on this node's partition for one round."""
    return _serve("train", msg, context)
