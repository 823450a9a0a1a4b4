"""The XPerT device as a Flower ClientApp: register, select, fine-tune.

Handlers only translate messages (``protocol``) to the framework-free device steps in
``clients.device``. What leaves the device: its opaque user id (and, for evaluation, its style
label), its choice (ids, merge weights, one distance) with what choosing cost it (bytes, evaluations,
tokens, seconds), and after fine-tuning its new adapter with cost metrics. Its samples, its drift
embedding, its coordinates and any per-candidate score (a baseline's losses or cosines) never do.

Which user a device is comes from ``node_config["partition-id"]`` (set per virtual node by the
simulation, or ``--node-config "partition-id=3"`` on a real SuperNode); what data that user has
comes from the run config (``user-styles``, ``user-samples``, ``test-fraction``, ``corpus``, ``seed``).
The fine-tuning engine too: run-config key ``trainer`` = ``"torch"`` (PyTorch + PEFT) or ``"ort"``
(ONNX Runtime training on the artifacts a phone runs, ``xpert_fl.device``; exported on first use and
cached on disk, so the first ``ort`` round of a device pays minutes of export once).

torch/transformers are imported inside the handlers that need them: under the Deployment Engine each
message starts a fresh ClientApp process, and registering (or selecting from an empty cache) should
not pay seconds of imports.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import protocol

app = ClientApp()
LOG = logging.getLogger("flwr.xpert.device")


def _data(context: Context):
    from clients.users import DataConfig, user_data

    try:
        partition = int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError("this SuperNode has no integer node_config 'partition-id' (which user it is)") from err
    return user_data(partition, DataConfig.from_run_config(context.run_config))


def _models(context: Context):
    from clients import device
    from xpert_fl.models import DEFAULT_SPEC

    spec = str(context.run_config.get("model", DEFAULT_SPEC))
    models = device.device_models(spec, str(context.run_config.get("summarizer", spec)))
    device.set_threads(_threads(context))
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
    """Run the requested selection method (XPerT: coordinates of the user's own data on the received
    basis -> nearest pLLM or merge, Eq. 1; or a baseline on its offer) -> the choice and its cost."""
    t0 = time.perf_counter()
    req = protocol.parse_select(msg.content)
    data = _data(context)
    if not req.ids:  # an empty cache: start from the base model, no model needed to decide that
        from xpert_fl.select import Choice

        choice, cost = Choice("base"), protocol.SelectionCost(req.method)
    else:
        from clients.device import choose, set_threads

        set_threads(_threads(context))  # also for methods that load no model (text-encoder)
        selection = choose(data, req, lambda: _models(context))
        choice, cost = selection.choice, protocol.SelectionCost.of(selection)
    LOG.info("%s: %s %s %s among %s pLLM(s) in %.1fs (%s bytes, %s evaluations)", data.user, req.method,
             choice.kind, list(choice.ids), len(req.ids), time.perf_counter() - t0, cost.bytes_down, cost.evaluations)
    return Message(protocol.choice_reply(choice, cost), reply_to=msg)


@app.train()
def fit(msg: Message, context: Context) -> Message:
    """Merge if asked, fine-tune the chosen start on the user's data, upload the new adapter."""
    from clients.device import finetune_config, self_report, train, training_metrics
    from xpert_fl.device import get_trainer
    from xpert_fl.explain import ProbeConfig

    t0 = time.perf_counter()
    req = protocol.parse_train_request(msg.content)
    data = _data(context)
    engine = str(context.run_config.get("trainer", "torch"))
    trainer = get_trainer(engine)
    models = _models(context)
    config = finetune_config(req.finetune, _threads(context))
    result = train(models, data, req.choice, req.adapters, config, req.compare_scratch, trainer)
    report = {"start": result.start_kind, "stop_reason": result.result.stop_reason, "trainer": engine}
    drift = None
    if bool(context.run_config.get("self-reports", True)):
        probe = ProbeConfig(max_new_tokens=int(context.run_config.get("probe-max-new-tokens", 48)))
        drift = self_report(models, data, probe)
        report["summarizer"] = models.summarizer.fingerprint
    reply = protocol.upload_reply(result.result.adapter, training_metrics(result), report, drift)
    LOG.info("%s: fine-tuned (%s) from %s, %s steps, %.1fs in all", data.user, engine, result.start_kind,
             result.result.steps, time.perf_counter() - t0)
    return Message(reply, reply_to=msg)
