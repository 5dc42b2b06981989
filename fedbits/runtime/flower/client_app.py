"""The fedbits ClientApp: relays each request to the node's worker (or serves it here).

Flower starts a fresh process for every message, so this module imports no torch:
with ``fedbits-worker = true`` in the node config (what ``fedbits flower supernode``
sets) it hands the downlink to the node's long-lived worker and returns the worker's
uplink. Without a worker (a plain ``flower-supernode``) it builds the node's session
in this process from the node config (:class:`~.holder.NodeSettings`: the holder's
data and pins), which reloads the model every message but gives the same bytes.

Node configuration errors (no ``client-id``, an unusable directory), refusals and
malformed requests come back as the reply's error text, which the server records as
the client's rejection reason.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedbits.errors import FedbitsError
from fedbits.logs import configure
from fedbits.runtime.flower import worker
from fedbits.runtime.flower.holder import NodeSettings
from fedbits.runtime.flower.protocol import CONFIG_KEY, NodeReply, Request

app = ClientApp()


def _serve(op: str, msg: Message, context: Context) -> Message:
    partition = -1
    try:
        settings = NodeSettings.from_node_config(context.node_config)
        partition = settings.client
        config_text = context.run_config.get(CONFIG_KEY)
        if not isinstance(config_text, str):
            raise FedbitsError(f"the run config has no {CONFIG_KEY!r}: not a fedbits app")
        request = Request.from_content(msg.content)
        if settings.worker:
            reply = worker.call(settings.root, op, config_text, partition, request)
        else:
            from fedbits.runtime.flower.node import NodeHost

            configure()  # the node's progress lines, in this process's (the SuperNode's) log
            reply = NodeHost(settings).handle(op, config_text, request)
    except FedbitsError as e:
        reply = NodeReply(error=str(e), partition=partition)
    return Message(reply.to_content(), reply_to=msg)


@app.query()
def prepare(msg: Message, context: Context) -> Message:
    """Say which client this node is, after checking the run against what its data
    holder accepts and getting the run's model ready (or say why it refuses)."""
    return _serve("prepare", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the method's client half on this node's data for one round."""
    return _serve("train", msg, context)
