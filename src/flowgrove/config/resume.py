"""The keys a resume may change: where and how a run goes on, never what it trains.

``flowgrove train --resume RUN key=value`` takes ``key=value`` items for these keys only (a reward server that moved,
the checkpoint and evaluation cadence, threads, the device, timeouts, FSDP2's CPU offload); any other key is refused with one line, since
it would change what the run trains (start a new run for that). The run folder's ``config.yaml`` is written back with
the values a resume took, and a later resume takes these keys from it as well: a moved server stays moved.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from flowgrove.config.load import parse_overrides
from flowgrove.messages import ConfigError

# dotted keys (``*``: any reward name) that a resume may change
RESUME_KEYS = (
    "reward_options.*.url", "reward_options.*.timeout", "reward_options.*.retries", "reward_options.*.backoff",
    "run.checkpoint_every", "run.keep_checkpoints", "run.progress", "run.threads", "run.device",
    "run.collective_timeout", "run.offload", "eval.every",
)


def resumable(key: str) -> bool:
    """Whether a resume may change the dotted config key ``key``."""
    return any(fnmatchcase(key, pattern) for pattern in RESUME_KEYS)


def flat_keys(node: object, prefix: str = "") -> dict[str, object]:
    """Nested dicts -> ``{"section.key": value}`` (a list or any other value is one leaf)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, object] = {}
    for key, value in node.items():
        out.update(flat_keys(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in out.items()}


def _nested(flat: dict[str, object]) -> dict:
    """``{"section.key": value}`` -> nested dicts (the inverse of :func:`flat_keys`)."""
    out: dict = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def resume_overrides(overrides: list[str]) -> dict:
    """The config layer of a resume's ``key=value`` items; :class:`ConfigError` naming the first key a resume may not
    change."""
    layer = parse_overrides(overrides)
    for key in flat_keys(layer):
        if not resumable(key):
            raise ConfigError(f"{key} cannot change when a run resumes: it changes what the run trains; start a new run "
                              f"with another --out for that (a resume may change: {', '.join(RESUME_KEYS)})")
    return layer


def carried(saved: dict, folder: dict) -> dict:
    """The layer of the resumable keys whose values the run folder's config (``folder``) changed from the
    checkpoint's (``saved``): what an earlier resume or an edit set for a moved world."""
    before = flat_keys(saved)
    return _nested({k: v for k, v in flat_keys(folder).items() if resumable(k) and (k not in before or before[k] != v)})
