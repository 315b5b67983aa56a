"""The lists inside the server settings as resources of their own (R-OPS-1, R-ADM-2).

``/v1/settings/dnsbl-zones``, ``/v1/settings/trusted-hosts``, ``/v1/settings/helo-rules`` and
``/v1/settings/ip-whitelist``: GET the list, POST one item, DELETE one item. Adding a zone no
longer means sending the whole settings document back: each add or delete is one atomic
read-modify-write of the server document (a Redis WATCH), so two administrators adding
different items at once both keep theirs. The list's ETag is a digest of its items; a write
with a stale ``If-Match`` is a 412 and changes nothing.

A HELO rule is an object, so it is named in the path by its id, a digest of the rule; the
string lists are named by the item itself (a CIDR's ``/`` may be sent as is or as ``%2F``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from rempart.admin_api.backend import ProblemError, invalid
from rempart.admin_api.models import FieldError
from rempart.admin_api.preconditions import check_if_match, etag_of
from rempart.common.config import MailSettings, deep_merge
from rempart.common.directory import valid_domain_name

MAX_ITEMS = 1000
MAX_ITEM = 256
RULE_ID_HEX = 16


class ListItem(BaseModel):
    item: str = Field(min_length=1, max_length=MAX_ITEM, description="The value to add")

    model_config = {"extra": "forbid"}


class StringListOut(BaseModel):
    items: list[str]
    version: int = Field(description="The settings version after the last change")


class HeloRuleIn(BaseModel):
    """R-REL-5: the first rule that matches the HELO name decides; no match accepts."""

    model_config = {"extra": "forbid"}

    match: Literal["exact", "wildcard", "regex"]
    pattern: str = Field(min_length=1, max_length=MAX_ITEM)
    action: Literal["accept", "reject"]


class HeloRuleOut(HeloRuleIn):
    id: str = Field(description="Names the rule in DELETE /v1/settings/helo-rules/{id}")


class HeloRuleListOut(BaseModel):
    items: list[HeloRuleOut] = Field(description="In the order they are tried")
    version: int


@dataclass(frozen=True)
class SettingsList:
    name: str  # the path segment
    section: str
    field: str
    what: str  # for people: "DNSBL zone"
    clean: Callable[[str], str]  # normalise one string item or raise ValueError with the reason

    def items(self, doc: dict[str, Any]) -> list[Any]:
        """The effective list (defaults included) of a stored server document."""
        settings = MailSettings.model_validate(deep_merge(MailSettings().model_dump(), doc))
        value: list[Any] = getattr(getattr(settings, self.section), self.field)
        return list(value)

    def with_items(self, doc: dict[str, Any], items: list[Any]) -> dict[str, Any]:
        return deep_merge(doc, {self.section: {self.field: items}})


def _zone(raw: str) -> str:
    name = raw.strip().lower().rstrip(".")
    if not valid_domain_name(name):
        raise ValueError("not a DNS zone name")
    return name


def _network(raw: str) -> str:
    text = raw.strip()
    try:
        if "/" in text:
            network = ipaddress.ip_network(text, strict=False)
            return str(network.network_address) if network.num_addresses == 1 else network.compressed
        return ipaddress.ip_address(text).compressed
    except ValueError:
        raise ValueError("not an IP address or network (CIDR)") from None


def _host(raw: str) -> str:
    try:
        return _network(raw)
    except ValueError:
        name = raw.strip().lower().rstrip(".")
        if valid_domain_name(name):
            return name
        raise ValueError("not an IP address, network (CIDR) or host name") from None


def _helo_only(raw: str) -> str:
    raise ValueError("a HELO rule is an object")  # never called: HELO rules have their own body


LISTS: dict[str, SettingsList] = {
    "dnsbl-zones": SettingsList("dnsbl-zones", "dns", "dnsbl_zones", "DNSBL zone", _zone),
    "trusted-hosts": SettingsList("trusted-hosts", "relay", "trusted_hosts", "Trusted host", _host),
    "ip-whitelist": SettingsList("ip-whitelist", "ips", "whitelist", "Whitelisted address", _network),
    "helo-rules": SettingsList("helo-rules", "relay", "helo_rules", "HELO rule", _helo_only),
}


def rule_id(rule: dict[str, str]) -> str:
    body = json.dumps({k: rule.get(k, "") for k in ("match", "pattern", "action")}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:RULE_ID_HEX]


def helo_rule(body: HeloRuleIn) -> dict[str, str]:
    if body.match == "regex":
        try:
            re.compile(body.pattern)
        except re.error as exc:
            raise invalid("Not a regular expression", "pattern", f"does not compile: {exc.msg}") from None
    pattern = body.pattern if body.match == "regex" else body.pattern.strip().lower()
    return {"match": body.match, "pattern": pattern, "action": body.action}


def clean_item(spec: SettingsList, raw: str) -> str:
    try:
        return spec.clean(raw)
    except ValueError as exc:
        raise invalid(f"Not a valid {spec.what.lower()}", "item", str(exc)) from None


def list_etag(items: list[Any]) -> str:
    return etag_of(items)


def adding(spec: SettingsList, item: Any, if_match: str | None, before: list[Any]) -> Callable[
        [dict[str, Any]], dict[str, Any]]:
    """The change that adds ``item`` (409 if present, 422 past the bound), checking If-Match on the
    list as stored at that moment; ``before`` receives the list it was applied to."""

    def change(current: dict[str, Any]) -> dict[str, Any]:
        items = spec.items(current)
        check_if_match(if_match, list_etag(items))
        before[:] = items
        if item in items:
            raise ProblemError(409, f"{spec.what} already listed")
        if len(items) >= MAX_ITEMS:
            raise ProblemError(422, f"At most {MAX_ITEMS} items", [FieldError(field="item", detail="list is full")])
        return spec.with_items(current, [*items, item])

    return change


def removing(spec: SettingsList, matches: Callable[[Any], bool], if_match: str | None,
             before: list[Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def change(current: dict[str, Any]) -> dict[str, Any]:
        items = spec.items(current)
        check_if_match(if_match, list_etag(items))
        before[:] = items
        kept = [i for i in items if not matches(i)]
        if len(kept) == len(items):
            raise ProblemError(404, f"{spec.what} not found")
        return spec.with_items(current, kept)

    return change
