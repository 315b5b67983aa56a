"""The HELO/EHLO filter (R-REL-5) and the connection delay, or tarpit (R-REL-6).

HELO rules are ordered ``{"match": "exact"|"wildcard"|"regex", "pattern": ..., "action":
"accept"|"reject"}``; the first rule that matches decides, and no match accepts. Rules are
compiled once per distinct rule list (so once per settings version that changes them); a rule
that does not compile, or names an unknown match or action, is skipped and logged, so that one
bad rule never stops mail. Patterns are capped in length, and the HELO name is matched only on
its first 255 characters (RFC 1035's limit on a name), which bounds the regex work per call.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, replace
from functools import lru_cache

from rempart.policy import replies
from rempart.policy.decision import CheckContext, Decision, ip_in, reject

log = logging.getLogger(__name__)

MAX_PATTERN = 256
MAX_HELO = 255
MAX_RULES = 1000


@dataclass(frozen=True)
class HeloRule:
    regex: re.Pattern[str]
    accept: bool
    source: str


@lru_cache(maxsize=16)
def compile_rules(rules: tuple[tuple[str, str, str], ...]) -> tuple[HeloRule, ...]:
    out: list[HeloRule] = []
    for match, pattern, action in rules[:MAX_RULES]:
        if action not in ("accept", "reject") or not pattern or len(pattern) > MAX_PATTERN:
            log.warning("helo rule skipped: bad action or pattern", extra={"rule": f"{match}:{pattern[:64]}"})
            continue
        try:
            if match == "exact":
                regex = re.compile(re.escape(pattern.lower().rstrip(".")), re.IGNORECASE)
            elif match == "wildcard":
                regex = re.compile(fnmatch.translate(pattern.lower()), re.IGNORECASE)
            elif match == "regex":
                regex = re.compile(pattern, re.IGNORECASE)
            else:
                raise ValueError(f"unknown match {match!r}")
        except (re.error, ValueError) as exc:
            log.warning("helo rule skipped: %s", exc, extra={"rule": f"{match}:{pattern[:64]}"})
            continue
        # Exact and wildcard rules name the whole HELO; a regex finds its pattern anywhere.
        if match != "regex":
            regex = re.compile(f"(?:{regex.pattern})\\Z", re.IGNORECASE)
        out.append(HeloRule(regex, action == "accept", f"{match}:{pattern}"))
    return tuple(out)


def _rules_key(rules: list[dict[str, str]]) -> tuple[tuple[str, str, str], ...]:
    return tuple(
        (str(r.get("match", "")).lower(), str(r.get("pattern", "")), str(r.get("action", "")).lower())
        for r in rules
    )


def printable(text: str) -> str:
    return "".join(c for c in text if " " < c < "\x7f")[:MAX_HELO]


async def check_helo(ctx: CheckContext) -> Decision | None:
    relay = ctx.settings.relay
    if not relay.helo_filter_enabled or not ctx.is_smtp or ctx.trusted or ip_in(ctx.ip, relay.helo_bypass):
        return None
    helo = ctx.session.helo_name.strip()[:MAX_HELO]
    name = helo.lower()
    if name.endswith(".") and not name.startswith("["):
        name = name[:-1]
    for rule in compile_rules(_rules_key(relay.helo_rules)):
        if rule.regex.match(name) if rule.source.startswith(("exact:", "wildcard:")) else rule.regex.search(name):
            if rule.accept:
                return None
            log.info("helo rejected", extra={"session": ctx.session.session_id, "client_ip": ctx.client_ip,
                                             "helo": printable(helo), "helo_rule": rule.source})
            return reject(550, "5.7.1", replies.helo_rejected(printable(helo)), "R-REL-5")
    return None


def tarpit(ctx: CheckContext, decision: Decision) -> Decision:
    """R-REL-6: the edge waits this long before its greeting (trusted hosts never wait)."""
    seconds = ctx.settings.relay.connect_delay_seconds
    if seconds <= 0 or ctx.whitelisted or not ctx.is_smtp:
        return decision
    return replace(decision, delay_ms=int(seconds * 1000), rule=decision.rule or "R-REL-6")
