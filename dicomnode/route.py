"""Rule matching: which model and destinations a series goes to, decided over *all* its instances.

Rules are tried in order and the first rule that matches at least one instance of the series wins;
only the instances it matched are processed. Looking at every instance (not just the first file)
matters for mixed series, e.g. a localizer and the images of one acquisition sharing a series, or
a fundus series where only some images carry the right ImageType.

Value semantics (documented in docs/configuration.md):

- a match value is compared with the tag's value as text, case-sensitively;
- a multi-valued tag (ImageType ``ORIGINAL\\PRIMARY\\AXIAL``) matches when any single value matches,
  or when the whole backslash-joined value does;
- an absent tag counts as the empty string, so ``""`` or ``{regex: ".*"}`` matches it;
- ``{regex: P}`` uses ``re.fullmatch`` (anchor-free patterns still have to match the whole value);
- ``CallingAETitle`` is the AE title of the sender, not a DICOM tag.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydicom.multival import MultiValue

from dicomnode.config import CALLING_AET_KEY, MatchValue, NodeConfig, RegexMatch, Rule
from dicomnode.headers import plain_scalar

__all__ = ["CALLING_AET", "RouteDecision", "decide", "rule_matches", "routing_keywords"]

logger = logging.getLogger(__name__)

CALLING_AET = CALLING_AET_KEY


@dataclass(frozen=True)
class RouteDecision:
    """What to do with one series.

    ``matched`` holds the indices (into the ``instances`` given to :func:`decide`) of the instances
    the rule matched: only these are enhanced or forwarded; the others are left alone.
    """

    action: Literal["enhance", "forward", "ignore"]
    rule: str | None  # None when the unmatched policy decided
    model: str | None
    destinations: tuple[str, ...]
    matched: tuple[int, ...]


def routing_keywords(config: NodeConfig) -> set[str]:
    """Every match key any rule uses (DICOM keywords and possibly CallingAETitle)."""
    return {key for rule in config.rules for key in rule.match}


def _values(value: Any) -> list[str]:
    """Candidates a match value is compared with: each single value, plus the joined form."""
    if value is None:
        return [""]
    if isinstance(value, (MultiValue, list, tuple)):
        parts = [plain_scalar(v) for v in value]
        return [*parts, "\\".join(parts)] if len(parts) != 1 else parts
    text = plain_scalar(value)
    if "\\" in text:  # a multi-value stored as one string
        return [*text.split("\\"), text]
    return [text]


def _value_matches(expected: MatchValue, actual: Any) -> bool:
    candidates = _values(actual)
    if isinstance(expected, RegexMatch):
        return any(expected.pattern.fullmatch(c) for c in candidates)
    if isinstance(expected, str):
        return expected in candidates
    return any(e in candidates for e in expected)


def rule_matches(rule: Rule, instance: Mapping[str, Any], calling_aet: str) -> bool:
    """True when every match key of ``rule`` matches this instance's values."""
    for key, expected in rule.match.items():
        if key == CALLING_AET:
            actual = instance.get(CALLING_AET, calling_aet)
        else:
            actual = instance.get(key)
        if not _value_matches(expected, actual):
            return False
    return True


def decide(config: NodeConfig, instances: Sequence[Mapping[str, Any]], calling_aet: str) -> RouteDecision:
    """Route one series: the first rule matching any instance wins, else the unmatched policy.

    ``instances`` are tag mappings as returned by :func:`routing_tags` (an instance mapping may carry
    its own ``CallingAETitle``, which then overrides ``calling_aet``).
    """
    for rule in config.rules:
        matched = tuple(i for i, inst in enumerate(instances) if rule_matches(rule, inst, calling_aet))
        if not matched:
            continue
        if rule.model is not None:
            action: Literal["enhance", "forward", "ignore"] = "enhance"
        elif rule.destinations:
            action = "forward"
        else:
            action = "ignore"
        decision = RouteDecision(action, rule.name, rule.model, tuple(rule.destinations), matched)
        logger.debug("rule %r matched %d of %d instances: %s", rule.name, len(matched), len(instances), action)
        return decision
    policy = config.unmatched
    if policy.action == "forward":
        return RouteDecision("forward", None, None, tuple(policy.destinations), tuple(range(len(instances))))
    return RouteDecision("ignore", None, None, (), ())
