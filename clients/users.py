"""Users and their personal data (light: no torch), for the device and the ClientApp.

The run config's ``user-styles`` is a ``;``-separated list of user *specs*, each a style
(``sarcastic``) or a weighted mixture (``sarcastic:0.7,poetic:0.3``). The device with partition id
``p`` is user ``p`` with spec ``specs[p % len(specs)]`` and data index ``p // len(specs)``: users of
the same spec get disjoint samples (``user_samples``' ``user_index``) from the corpus's *user* role.
Its evaluation label (simulation ground truth, never used by selection) is the spec's heaviest style.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from protocol.run_config import Common, Section
from xpert_fl.data import load_corpus, split_roles, train_test_split, user_samples
from xpert_fl.data.corpus import Sample


# --- users and their data -----------------------------------------------------------------------
def parse_user_styles(text: str) -> list[dict[str, float]]:
    """``"sarcastic;poetic:0.7,expert:0.3"`` -> ``[{"sarcastic": 1.0}, {"poetic": 0.7, "expert": 0.3}]``."""
    specs = []
    for part in (p.strip() for p in str(text).split(";")):
        if not part:
            continue
        mix: dict[str, float] = {}
        for item in (i.strip() for i in part.split(",")):
            name, _, weight = item.partition(":")
            try:
                w = float(weight) if weight else 1.0
            except ValueError as err:
                raise ValueError(f"user spec {part!r}: weight of {name!r} is not a number") from err
            if not name.strip() or w < 0:
                raise ValueError(f"user spec {part!r}: need style names with non-negative weights")
            mix[name.strip().lower()] = mix.get(name.strip().lower(), 0.0) + w
        if sum(mix.values()) <= 0:
            raise ValueError(f"user spec {part!r}: weights sum to zero")
        specs.append(mix)
    if not specs:
        raise ValueError(f"user-styles {text!r} names no user")
    return specs


@dataclass(frozen=True)
class UserData:
    """One user's personal data (never sent anywhere) and the identity it may reveal."""

    user: str  # opaque id sent to the server
    label: str  # evaluation label: the heaviest style of its spec
    mixture: dict[str, float]
    train: list[Sample]
    test: list[Sample]


@dataclass(frozen=True)
class DataConfig(Section):
    """Which data each user has: run-config keys ``user-styles``, ``user-samples``, ``test-fraction``
    (with ``Common``'s ``corpus`` and ``seed``); a section of ``clients.config.DeviceConfig``."""

    user_styles: str
    user_samples: int
    test_fraction: float


@lru_cache(maxsize=4)
def _user_role(corpus: str, seed: int):
    return split_roles(load_corpus(corpus), seed=seed)["user"]


def user_data(partition_id: int, cfg: DataConfig, common: Common) -> UserData:
    """The personal data of the user with this partition id (deterministic from ``common.seed``), from
    the user role of ``common.corpus``."""
    if partition_id < 0:
        raise ValueError(f"partition-id must be >= 0, got {partition_id}")
    specs = parse_user_styles(cfg.user_styles)
    mixture = specs[partition_id % len(specs)]
    index = partition_id // len(specs)
    seed = common.seed
    samples = user_samples(_user_role(common.corpus, seed), mixture, cfg.user_samples, user_index=index, seed=seed)
    train, test = train_test_split(samples, cfg.test_fraction, seed=seed + partition_id)
    if not train or not test:
        raise ValueError(f"user {partition_id}: {len(samples)} samples give no train/test split; raise user-samples")
    label = max(mixture, key=lambda s: (mixture[s], s))
    return UserData(f"user-{partition_id}", label, dict(mixture), train, test)


