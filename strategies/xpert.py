"""XPerTStrategy: a Flower server strategy in which aggregation is replaced by pLLM caching.

One XPerT round (paper Fig. 3), for the users (nodes) arriving this round:

1. ``configure_select``: each gets the basis and the cached pLLMs' ids + coordinates (``query.select``),
   or, with run-config ``selection`` naming a baseline of ``xpert_fl.baselines``, what that method needs
   on the device: the same pLLMs' adapters (exhaustive, bo, hyperband), their text embeddings
   (text-encoder), their labels (oracle) or just their ids (scratch, random).
2. ``aggregate_select``: each replies with its choice (one id, ids + merge weights, or the base) and
   what choosing cost it (``protocol.SelectionCost``; recorded in ``UserRound.selection``).
3. ``configure_train``: each gets exactly the adapter(s) it chose (``train``).
4. ``aggregate_train``: each upload is validated, probed, explained (the basis grows when needed) and
   cached with the chosen ids as parents.

Replies that fail, time out or are invalid are recorded (``UserRound.status``) and skipped; the round
goes on. Every method is a pure step over messages, so the round logic runs without Flower running
(tests feed it fake replies); ``start`` wires the steps to a ``Grid``. Each method also accounts the
bytes of every message it creates or receives, per device and kind (``protocol``).

Nodes are identified to the server by an opaque user id they announce once (``query.register``);
sampling is a seeded permutation of the registered users, consumed round by round (users *arrive*),
so a run is reproducible from its seed even though Flower's node ids are random.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

import protocol
from strategies.config import XPerTConfig
from strategies.pllm_server import PLLMServer
from xpert_fl.adapters import AdapterError
from xpert_fl.baselines import SELECTORS
from xpert_fl.baselines.core import ADAPTERS, EMBEDDINGS, LABELS, selection_seed
from xpert_fl.cache import CacheError
from xpert_fl.select import Choice

LOG = logging.getLogger("flwr.xpert")


# --- what happened to one user in one round (one JSONL line) ---------------------------------------
@dataclass
class UserRound:
    round: int
    node_id: int
    user: str
    label: str | None  # the user's evaluation label (reported by the device; None if not reported)
    method: str = "xpert"  # the selection method the device ran (run-config selection)
    # ok | duplicate | select-{error,timeout,invalid,unavailable} | train-{error,timeout,unavailable} |
    # upload-invalid (the reply breaks the protocol) | upload-rejected (a well-formed adapter the server refuses:
    # another base model, wrong shapes, too large) | explain-failed (the server's own probe or explanation failed)
    status: str = "pending"
    error: str | None = None
    offered: int = 0  # pLLMs offered
    basis_size: int = 0  # words of the basis sent (XPerT only)
    choice: str | None = None  # single | merge | base
    chosen: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    chosen_labels: list[str | None] = field(default_factory=list)
    chosen_label: str | None = None  # label of the heaviest parent ("base" for the base model)
    distance: float | None = None  # selection distance to the chosen pLLM (None: nothing offered, or not XPerT)
    style_available: bool | None = None  # an offered pLLM has the user's label (None: label unknown)
    correct: bool | None = None  # chosen_label == label; judged only when style_available
    new_id: str | None = None
    explanation: str | None = None
    added_words: list[str] = field(default_factory=list)
    examined: int = 0
    residual_ratio: float | None = None
    explain_seconds: float | None = None
    explained_by: str | None = None  # "probe" | "self-report" (the device's, verified against the probe)
    self_report: str | None = None  # what became of the device's self-report (None: it sent none)
    finetune: dict = field(default_factory=dict)  # the device's cost metrics
    trainer: str | None = None  # the device's fine-tuning engine ("torch" | "ort"), as it reported
    bytes: dict = field(default_factory=lambda: {k: 0 for k in protocol.KINDS})
    # what choosing cost the device, as its method counts it (protocol.SelectionCost.to_json; {}: not
    # reported): bytes by payload kind and bytes_down, evaluations, tokens, seconds, adapters downloaded
    selection: dict = field(default_factory=dict)

    @property
    def bytes_received(self) -> int:
        return sum(self.bytes[k] for k in protocol.DOWN_KINDS)

    @property
    def bytes_sent(self) -> int:
        return sum(self.bytes[k] for k in protocol.UP_KINDS)

    def fail(self, status: str, error: str) -> None:
        self.status, self.error = status, error
        LOG.warning("round %s %s: %s (%s)", self.round, self.user, status, error)

    def to_json(self) -> dict:
        d = asdict(self)
        d["bytes_received"], d["bytes_sent"] = self.bytes_received, self.bytes_sent
        return d


@dataclass
class RoundResult:
    round: int
    users: list[UserRound]
    cache_size: int
    basis_size: int
    basis_words: list[str]
    seconds: float
    phases: dict = field(default_factory=dict)  # seconds per phase: register, select, train, ingest


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 2)
        self._t = now


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _reply_error(reply: Message) -> str:
    return f"device error {reply.error.code}: {reply.error.reason}"


# --- the strategy -----------------------------------------------------------------------------------
class XPerTStrategy:
    """Caching and explaining instead of aggregating. ``on_round`` is called with each RoundResult."""

    def __init__(
        self, config: XPerTConfig, server: PLLMServer, on_round: Callable[[RoundResult], None] | None = None
    ):
        self.config, self.server, self.on_round = config, server, on_round
        self.users: dict[int, tuple[str, str | None]] = {}  # node id -> (user id, label)
        self.history: list[RoundResult] = []
        self._register_bytes: dict[int, tuple[int, int]] = {}  # not yet attributed to a round
        self._pending: dict[int, tuple[Message, UserRound]] = {}  # node -> (sent message, record)
        self._current: dict[int, UserRound] = {}
        self._offer: tuple[list[str], object] | None = None
        self._labels: dict[str, str | None] = {}

    def summary(self) -> None:
        c = self.config
        LOG.info(
            "XPerTStrategy: %s round(s), %s user(s)/round, selection %s, delta=%s, probe %s prompts x %s tokens, "
            "fine-tuning <= %s steps; cache %s (%s pLLMs, basis %s words)",
            c.rounds.num_server_rounds, c.rounds.users_per_round or "all", c.select.selection, c.select.merge_delta,
            c.probe.num_probe_prompts, c.probe.probe_max_new_tokens, c.budget.max_steps, self.server.cache.root,
            len(self.server.cache), self.server.basis.size,
        )

    # --- registration ----------------------------------------------------------------------------
    def configure_register(self, node_ids: Iterable[int]) -> list[Message]:
        """A tiny ``query.register`` to every node not registered yet."""
        msgs = [
            Message(protocol.register_request(), dst_node_id=n, message_type=protocol.REGISTER, group_id="0")
            for n in sorted(node_ids) if n not in self.users
        ]
        self._pending = {m.metadata.dst_node_id: (m, None) for m in msgs}
        return msgs

    def aggregate_register(self, replies: Iterable[Message]) -> list[int]:
        """Record each node's user id; failed nodes stay unregistered (retried next round)."""
        sent, self._pending = self._pending, {}
        done = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in sent:
                continue
            down, up = self._register_bytes.get(node, (0, 0))  # failed attempts count too
            self._register_bytes[node] = (down + protocol.message_bytes(sent[node][0]),
                                          up + protocol.message_bytes(reply))
            if reply.has_error():
                LOG.warning("node %s: registration failed (%s)", node, _reply_error(reply))
                continue
            try:
                user, label = protocol.parse_register(reply.content)
            except protocol.ProtocolError as err:
                LOG.warning("node %s: invalid registration (%s)", node, err)
                continue
            self.users[node] = (user, label)
            done.append(node)
        return done

    # --- sampling --------------------------------------------------------------------------------
    def arrival_order(self) -> list[int]:
        """Registered nodes in a seeded permutation of their user ids (reproducible across runs)."""
        nodes = sorted(self.users, key=lambda n: (_natural(self.users[n][0]), n))
        random.Random(self.config.common.seed).shuffle(nodes)
        return nodes

    def sample(self, server_round: int, node_ids: Iterable[int]) -> list[int]:
        """The users arriving in ``server_round``: the next window of the arrival order (cyclic)."""
        online = set(node_ids)
        order = [n for n in self.arrival_order() if n in online]
        k = self.config.rounds.users_per_round
        if not order or k == 0 or k >= len(order):
            return order
        start = ((server_round - 1) * k) % len(order)
        return [order[(start + i) % len(order)] for i in range(k)]

    # --- select ----------------------------------------------------------------------------------
    def configure_select(self, server_round: int, node_ids: Iterable[int]) -> list[Message]:
        """``query.select`` to each sampled node, offering every explained pLLM: XPerT's basis and
        coordinates, or what the run's baseline method needs (``_request``). If the offer cannot be
        built (an unreadable adapter), every sampled user fails with ``select-unavailable``."""
        ids, coords = self.server.offer()
        self._offer = (ids, coords)
        self._labels = {i: self.server.label(i) for i in ids}
        self._current, self._pending = {}, {}
        method = self.config.select.selection
        try:
            req = self._request(ids, coords)
            error = None
        except (CacheError, AdapterError) as err:
            req, error = None, str(err)
        basis_size, kind = (self.server.basis.size, protocol.BASIS_COORDS) if method == "xpert" else (0, protocol.OFFER)
        msgs = []
        for node in node_ids:
            user, label = self.users.get(node, (f"node-{node}", None))
            rec = UserRound(server_round, node, user, label, method, offered=len(ids), basis_size=basis_size)
            down, up = self._register_bytes.pop(node, (0, 0))
            rec.bytes[protocol.REGISTER_DOWN], rec.bytes[protocol.REGISTER_UP] = down, up
            self._current[node] = rec
            if req is None:
                rec.fail("select-unavailable", error)
                continue
            msg = Message(self._content(req, server_round, user, label), dst_node_id=node,
                          message_type=protocol.SELECT, group_id=str(server_round))
            rec.bytes[kind] = protocol.message_bytes(msg)
            self._pending[node] = (msg, rec)
            msgs.append(msg)
        return msgs

    def _request(self, ids: list[str], coords) -> protocol.SelectRequest | protocol.OfferRequest:
        """This round's select request before its per-user parts. A baseline's offer carries what its
        selector ``receives``: every offered adapter (so the message really is the download of every
        pLLM, as the paper's Table 7 charges it), the text embeddings, the labels, or bare ids."""
        c = self.config
        s = c.select
        if s.selection == "xpert":
            return protocol.SelectRequest(
                self.server.basis, tuple(ids), coords, s.merge_delta, s.max_parents, c.probe.probe_fields(), s.distance
            )
        receives = SELECTORS[s.selection].receives
        parts: dict = {}
        if receives == ADAPTERS:
            parts["adapters"] = tuple(self.server.adapter(i) for i in ids)
        elif receives == EMBEDDINGS and ids:
            parts["embeddings"], parts["encoder"] = self.server.text_embeddings(ids)
        elif receives == LABELS:
            parts["labels"] = tuple(self._labels[i] for i in ids)
        ft = c.finetune_fields()
        return protocol.OfferRequest(
            s.selection, tuple(ids), trials=s.selection_trials or None, max_seq_len=ft["max_seq_len"],
            eval_batch_size=ft["eval_batch_size"], **parts,
        )

    def _content(
        self, req: protocol.SelectRequest | protocol.OfferRequest, server_round: int, user: str, label: str | None
    ) -> RecordDict:
        """One user's ``query.select`` content: XPerT's is everyone's; an offer gets the user-round's seed
        and, for the oracle, the label the user reported at registration."""
        if isinstance(req, protocol.SelectRequest):
            return protocol.select_request(req)
        user_label = label if SELECTORS[req.method].receives == LABELS else None
        seed = selection_seed(self.config.common.seed, server_round, user)
        return protocol.offer_request(replace(req, seed=seed, user_label=user_label))

    def aggregate_select(self, server_round: int, replies: Iterable[Message]) -> dict[int, Choice]:
        """Valid choices by node. A choice must name only offered ids, at most ``max-parents`` of them."""
        sent, self._pending = self._pending, {}
        offered = set(self._offer[0]) if self._offer else set()
        choices: dict[int, Choice] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in sent or node in choices:
                continue
            rec = sent[node][1]
            rec.bytes[protocol.CHOICE] = protocol.message_bytes(reply)
            if reply.has_error():
                rec.fail("select-error", _reply_error(reply))
                continue
            try:
                choice = protocol.parse_choice(reply.content)
                cost = protocol.parse_selection_cost(reply.content)
                if cost is not None and cost.method != rec.method:
                    raise protocol.ProtocolError(f"the device ran selection {cost.method!r}, not {rec.method!r}")
                unknown = [i for i in choice.ids if i not in offered]
                if unknown:
                    raise protocol.ProtocolError(f"chose pLLM(s) that were not offered: {unknown}")
                if len(choice.ids) > (top := self.config.select.max_parents):
                    raise protocol.ProtocolError(f"{len(choice.ids)} parents > max-parents {top}")
            except protocol.ProtocolError as err:
                rec.fail("select-invalid", str(err))
                continue
            self._record_choice(rec, choice)
            rec.selection = cost.to_json() if cost is not None else {}
            choices[node] = choice
        for node, (_, rec) in sent.items():
            if node not in choices and rec.status == "pending":
                rec.fail("select-timeout", "no reply within the timeout")
        return choices

    def _record_choice(self, rec: UserRound, choice: Choice) -> None:
        rec.choice, rec.chosen, rec.weights = choice.kind, list(choice.ids), list(choice.weights)
        rec.chosen_labels = [self._labels.get(i) for i in choice.ids]
        if choice.kind == "base":
            rec.chosen_label = "base"
        else:
            heaviest = max(range(len(choice.ids)), key=lambda j: choice.weights[j])
            rec.chosen_label = rec.chosen_labels[heaviest]
        rec.distance = choice.distance if rec.offered and rec.method == "xpert" else None
        if rec.label is not None:
            rec.style_available = rec.label in self._labels.values()
            rec.correct = (rec.chosen_label == rec.label) if rec.style_available else None

    # --- train -----------------------------------------------------------------------------------
    def configure_train(self, server_round: int, choices: Mapping[int, Choice]) -> list[Message]:
        """``train`` to each node with a valid choice: exactly the adapter(s) it chose + the budget."""
        self._pending = {}
        msgs = []
        for node, choice in choices.items():
            rec = self._current[node]
            try:
                adapters = [self.server.adapter(i) for i in choice.ids]
            except (CacheError, AdapterError) as err:
                rec.fail("train-unavailable", str(err))
                continue
            content = protocol.train_request(
                choice, adapters, self.config.finetune_fields(), self.config.budget.compare_scratch
            )
            msg = Message(content, dst_node_id=node, message_type=protocol.TRAIN, group_id=str(server_round))
            rec.bytes[protocol.ADAPTER_DOWN] = protocol.message_bytes(msg)
            self._pending[node] = (msg, rec)
            msgs.append(msg)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> list[UserRound]:
        """Validate, explain and cache each upload, in user-id order (the basis grows deterministically)."""
        sent, self._pending = self._pending, {}
        got: dict[int, Message] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in sent and node not in got:
                got[node] = reply
        for node in sorted(got, key=lambda n: (_natural(sent[n][1].user), n)):
            reply, rec = got[node], sent[node][1]
            rec.bytes[protocol.ADAPTER_UP] = protocol.message_bytes(reply)
            if reply.has_error():
                rec.fail("train-error", _reply_error(reply))
                continue
            try:
                upload = protocol.parse_upload(reply.content)
                rec.finetune, rec.trainer = upload.metrics, upload.report.get("trainer")
                metrics = {"round": server_round, "user": rec.user, "start": rec.choice, **upload.metrics}
                report = (upload.self_report, upload.report["summarizer"]) if upload.self_report is not None else None
                reports = self.config.reports
                trust = reports.self_report_min_cosine if reports.self_reports else None
                done = self.server.ingest(upload.adapter, rec.chosen, metrics, rec.label, report, trust)
            except protocol.ProtocolError as err:
                rec.fail("upload-invalid", str(err))
                continue
            except (AdapterError, CacheError) as err:
                rec.fail("upload-rejected", str(err))
                continue
            except Exception as err:  # noqa: BLE001 - a failed explanation must not end the round
                rec.fail("explain-failed", f"{type(err).__name__}: {err}")
                continue
            rec.status = "duplicate" if done.duplicate else "ok"
            rec.new_id, rec.explanation = done.entry.id, done.entry.explanation
            rec.added_words, rec.explain_seconds = done.added_words, done.explain_seconds
            rec.examined, rec.residual_ratio = done.examined, done.residual_ratio
            rec.explained_by, rec.self_report = done.explained_by, done.self_report
            what = "already cached" if done.duplicate else "cached"
            LOG.info("round %s %s: %s %s (%s)", server_round, rec.user, what, rec.new_id, rec.explanation)
        for node, (_, rec) in sent.items():
            if node not in got:
                rec.fail("train-timeout", "no reply within the timeout")
        return [self._current[n] for n in self._current]

    def finish_round(self, server_round: int, seconds: float, phases: dict | None = None) -> RoundResult:
        users = sorted(self._current.values(), key=lambda r: (_natural(r.user), r.node_id))
        result = RoundResult(
            server_round, users, len(self.server.cache), self.server.basis.size, list(self.server.basis.words), seconds,
            dict(phases or {}),
        )
        self.history.append(result)
        self._current = {}
        if self.on_round is not None:
            self.on_round(result)
        return result

    # --- wiring to Flower ------------------------------------------------------------------------
    def wait_for_nodes(self, grid: Grid, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while len(nodes := list(grid.get_node_ids())) < self.config.rounds.min_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of min-nodes={self.config.rounds.min_nodes} nodes connected")
            time.sleep(0.5)
        return nodes

    def start(self, grid: Grid, num_rounds: int | None = None, timeout: float | None = None) -> list[RoundResult]:
        """Run the rounds: register new nodes, sample, select, train, cache. Returns the history."""
        num_rounds = num_rounds or self.config.rounds.num_server_rounds
        timeout = self.config.rounds.timeout if timeout is None else timeout
        self.summary()
        self.wait_for_nodes(grid, timeout)
        for r in range(1, num_rounds + 1):
            t0 = time.perf_counter()
            clock = _Clock()
            nodes = list(grid.get_node_ids())
            if msgs := self.configure_register(nodes):
                self.aggregate_register(grid.send_and_receive(msgs, timeout=timeout))
            clock.lap("register")
            sampled = self.sample(r, nodes)
            LOG.info("[ROUND %s/%s] %s user(s): %s", r, num_rounds, len(sampled),
                     ", ".join(self.users[n][0] for n in sampled))
            msgs = self.configure_select(r, sampled)
            choices = self.aggregate_select(r, grid.send_and_receive(msgs, timeout=timeout) if msgs else [])
            clock.lap("select")
            if msgs := self.configure_train(r, choices):
                replies = grid.send_and_receive(msgs, timeout=timeout)
                clock.lap("train")
                self.aggregate_train(r, replies)
                clock.lap("ingest")
            result = self.finish_round(r, time.perf_counter() - t0, clock.laps)
            LOG.info("[ROUND %s] cache %s pLLMs, basis %s words, %.0fs (%s)", r, result.cache_size, result.basis_size,
                     result.seconds, ", ".join(f"{k} {v:.0f}s" for k, v in result.phases.items()))
        return self.history
