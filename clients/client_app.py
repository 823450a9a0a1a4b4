"""The XPerT device as a Flower ClientApp (PyTorch): register, select, fine-tune.

Handlers only translate messages (``strategies.protocol``) to the framework-free device steps in
``clients.device``. What leaves the device: its opaque user id (and, for evaluation, its style
label), its choice (ids, merge weights, one distance), and after fine-tuning its new adapter with
cost metrics. Its samples, its drift embedding and its coordinates never do.

Which user a device is comes from ``node_config["partition-id"]`` (set per virtual node by the
simulation, or ``--node-config "partition-id=3"`` on a real SuperNode); what data that user has
comes from the run config (``user-styles``, ``user-samples``, ``test-fraction``, ``corpus``, ``seed``).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.device import (
    DataConfig,
    DeviceModels,
    UserData,
    choose,
    device_models,
    finetune_config,
    set_threads,
    train,
    training_metrics,
    user_data,
)
from strategies import protocol
from xpert_fl.explain import ProbeConfig
from xpert_fl.models import DEFAULT_SPEC

app = ClientApp()


def _data(context: Context) -> UserData:
    try:
        partition = int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError("this SuperNode has no integer node_config 'partition-id' (which user it is)") from err
    return user_data(partition, DataConfig.from_run_config(context.run_config))


def _models(context: Context) -> DeviceModels:
    spec = str(context.run_config.get("model", DEFAULT_SPEC))
    models = device_models(spec, str(context.run_config.get("summarizer", spec)))
    set_threads(_threads(context))
    return models


def _threads(context: Context) -> int | None:
    threads = int(context.run_config.get("device-threads", 1))
    return threads if threads > 0 else None


@app.query("register")
def register(msg: Message, context: Context) -> Message:
    """Announce the device's opaque user id (and its evaluation label if the run reports labels)."""
    data = _data(context)
    label = data.label if bool(context.run_config.get("report-labels", True)) else None
    return Message(protocol.register_reply(data.user, label), reply_to=msg)


@app.query("select")
def select(msg: Message, context: Context) -> Message:
    """Coordinates of the user's own data on the received basis -> nearest pLLM or merge (Eq. 1)."""
    req = protocol.parse_select_request(msg.content)
    data = _data(context)
    probe = ProbeConfig(**req.probe)
    models = _models(context) if req.ids else None  # an empty cache needs no model at all
    choice, _ = choose(models, data, req.basis, req.coords_by_id(), req.delta, req.max_parents, probe)
    return Message(protocol.choice_reply(choice), reply_to=msg)


@app.train()
def fit(msg: Message, context: Context) -> Message:
    """Merge if asked, fine-tune the chosen start on the user's data, upload the new adapter."""
    req = protocol.parse_train_request(msg.content)
    data = _data(context)
    models = _models(context)
    config = finetune_config(req.finetune, _threads(context))
    result = train(models, data, req.choice, req.adapters, config, req.compare_scratch)
    report = {"start": result.start_kind, "stop_reason": result.result.stop_reason}
    reply = protocol.upload_reply(result.result.adapter, training_metrics(result), report)
    return Message(reply, reply_to=msg)
