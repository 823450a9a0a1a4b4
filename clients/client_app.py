"""The XPerT device as a Flower ClientApp: register, select, fine-tune.

Handlers only translate messages (``protocol``) to the framework-free device steps in
``clients.device``. What leaves the device: its opaque user id (and, for evaluation, its style
label), its choice (ids, merge weights, one distance) with what choosing cost it (bytes, evaluations,
tokens, seconds), and after fine-tuning its new adapter with cost metrics. Its samples, its drift
embedding, its coordinates and any per-candidate score (a baseline's losses or cosines) never do.

Which user a device is comes from ``node_config["partition-id"]`` (set per virtual node by the
simulation, or ``--node-config "partition-id=3"`` on a real SuperNode); everything else it reads from
the run config, through one dataclass (``clients.config.DeviceConfig``, no fallbacks): what data that
user has (``user-styles``, ``user-samples``, ``test-fraction``, ``corpus``, ``seed``), its models, its
threads, what it reports (``report-labels``, ``self-reports``) and its fine-tuning engine, ``trainer``
= ``"torch"`` (PyTorch + PEFT) or ``"ort"`` (ONNX Runtime training on the artifacts a phone runs,
``xpert_fl.device``; exported on first use and cached on disk, so the first ``ort`` round of a device
pays minutes of export once). What the server decides for a round travels in its messages.

torch/transformers are imported inside the handlers that need them: under the Deployment Engine each
message starts a fresh ClientApp process, and registering (or selecting from an empty cache) should
not pay seconds of imports.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import protocol

if TYPE_CHECKING:
    from clients.config import DeviceConfig

app = ClientApp()
LOG = logging.getLogger("flwr.xpert.device")


def _config(context: Context) -> DeviceConfig:
    """Every setting the device reads, from the run config (all keys present: Flower merged pyproject's)."""
    from clients.config import DeviceConfig

    return DeviceConfig.from_run_config(context.run_config)


def _data(context: Context, cfg: DeviceConfig):
    from clients.users import user_data

    try:
        partition = int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError("this SuperNode has no integer node_config 'partition-id' (which user it is)") from err
    return user_data(partition, cfg.data, cfg.common)


def _models(cfg: DeviceConfig):
    from clients import device

    models = device.device_models(cfg.common.model, cfg.common.summarizer)
    device.set_threads(cfg.device.threads())
    return models


@app.query("register")
def register(msg: Message, context: Context) -> Message:
    """Announce the device's opaque user id (and its evaluation label if the run reports labels)."""
    cfg = _config(context)
    data = _data(context, cfg)
    label = data.label if cfg.reports.report_labels else None
    return Message(protocol.register_reply(data.user, label), reply_to=msg)


@app.query("select")
def select(msg: Message, context: Context) -> Message:
    """Run the requested selection method (XPerT: coordinates of the user's own data on the received
    basis -> nearest pLLM or merge, Eq. 1; or a baseline on its offer) -> the choice and its cost."""
    t0 = time.perf_counter()
    req = protocol.parse_select(msg.content)
    cfg = _config(context)
    data = _data(context, cfg)
    if not req.ids:  # an empty cache: start from the base model, no model needed to decide that
        from xpert_fl.select import Choice

        choice, cost = Choice("base"), protocol.SelectionCost(req.method)
    else:
        from clients.device import choose, set_threads

        set_threads(cfg.device.threads())  # also for methods that load no model (text-encoder)
        selection = choose(data, req, lambda: _models(cfg))
        choice, cost = selection.choice, protocol.SelectionCost.of(selection)
    LOG.info("%s: %s %s %s among %s pLLM(s) in %.1fs (%s bytes, %s evaluations)", data.user, req.method,
             choice.kind, list(choice.ids), len(req.ids), time.perf_counter() - t0, cost.bytes_down, cost.evaluations)
    return Message(protocol.choice_reply(choice, cost), reply_to=msg)


@app.train()
def fit(msg: Message, context: Context) -> Message:
    """Merge if asked, fine-tune the chosen start on the user's data, upload the new adapter (and, if
    the run asks for self-reports, the embedding of the data it was trained on, with the run's probe
    settings, as the server embeds)."""
    from clients.device import finetune_config, self_report, train, training_metrics
    from xpert_fl.device import get_trainer

    t0 = time.perf_counter()
    req = protocol.parse_train_request(msg.content)
    cfg = _config(context)
    data = _data(context, cfg)
    engine = cfg.device.trainer
    trainer = get_trainer(engine)
    models = _models(cfg)
    config = finetune_config(req.finetune, cfg.device.threads())
    result = train(models, data, req.choice, req.adapters, config, req.compare_scratch, trainer)
    report = {"start": result.start_kind, "stop_reason": result.result.stop_reason, "trainer": engine}
    drift = None
    if cfg.reports.self_reports:
        drift = self_report(models, data, cfg.probe.config())
        report["summarizer"] = models.summarizer.fingerprint
    reply = protocol.upload_reply(result.result.adapter, training_metrics(result), report, drift)
    LOG.info("%s: fine-tuned (%s) from %s, %s steps, %.1fs in all", data.user, engine, result.start_kind,
             result.result.steps, time.perf_counter() - t0)
    return Message(reply, reply_to=msg)
