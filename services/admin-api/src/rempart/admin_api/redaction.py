"""R-ADM-3: no answer of the admin API carries a secret.

A setting is a secret when its field carries :data:`rempart.common.config.SECRET` (today
``dns.srs_secrets``). Such a field is write-only: a client may set it (PUT/PATCH) or rotate it,
never read it back. Every answer shows it as a :class:`SecretSummary` instead: how many values
are set and a short keyed fingerprint of each, so that an operator can tell whether two
replicas or two points in time hold the same key without anyone seeing it. The fingerprint is
an HMAC with ``REMPART_SECRET_KEY``: a weak value cannot be guessed offline from it.

The response models are derived from the settings models once, so that a secret added to
:class:`rempart.common.config.MailSettings` later is redacted (and typed as a summary in the
OpenAPI document) without a change here.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
from typing import Any

from pydantic import BaseModel, Field, create_model
from pydantic.fields import FieldInfo

from rempart.common.config import MailSettings

SECRET_MARK = "x-rempart-secret"  # noqa: S105 - the marker's name, see rempart.common.config.SECRET
FINGERPRINT_HEX = 12
REDACTED = "[redacted]"
# Event attributes named like this are never shown (defence in depth: no publisher should
# put a secret in an event, but the event log outlives the code that wrote it).
SECRET_ATTRIBUTE_WORDS = ("password", "secret", "token", "hash", "seed", "private", "key", "code")


class SecretSummary(BaseModel):
    """A write-only secret as answers show it: never the value."""

    count: int = Field(default=0, description="How many values are set (0: none).")
    fingerprints: list[str] = Field(
        default_factory=list,
        description="A keyed fingerprint of each value, in order; equal values give equal fingerprints.",
    )


def is_secret(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(SECRET_MARK))


def _sub_model(info: FieldInfo) -> type[BaseModel] | None:
    annotation = info.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def secret_paths(model: type[BaseModel] = MailSettings, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every secret field of ``model`` as a path of field names (``("dns", "srs_secrets")``)."""
    found: list[tuple[str, ...]] = []
    for name, info in model.model_fields.items():
        if is_secret(info):
            found.append((*prefix, name))
            continue
        sub = _sub_model(info)
        if sub is not None:
            found.extend(secret_paths(sub, (*prefix, name)))
    return found


def view_model(model: type[BaseModel]) -> type[BaseModel]:
    """``model`` with each secret field typed as :class:`SecretSummary` (the models answers use)."""
    fields: dict[str, Any] = {}
    changed = False
    for name, info in model.model_fields.items():
        sub = _sub_model(info)
        if is_secret(info):
            fields[name] = (SecretSummary, Field(default_factory=SecretSummary, description="Write-only secret."))
            changed = True
        elif sub is not None and (sub_view := view_model(sub)) is not sub:
            fields[name] = (sub_view, Field(default_factory=sub_view))
            changed = True
        else:
            fields[name] = (info.annotation, info)
    if not changed:
        return model
    view: type[BaseModel] = create_model(  # type: ignore[call-overload]
        f"{model.__name__}View", __doc__=model.__doc__, **fields
    )
    return view


MailSettingsView = view_model(MailSettings)


class Redactor:
    """Turns stored settings documents into what an answer may show."""

    def __init__(self, key: str) -> None:
        self._key = hashlib.sha256(b"rempart-admin-fingerprint\0" + key.encode()).digest()
        self.paths = secret_paths()

    def fingerprint(self, value: str) -> str:
        return hmac.new(self._key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[
            :FINGERPRINT_HEX
        ]

    def summary(self, value: Any) -> dict[str, Any]:
        values = value if isinstance(value, list) else ([] if value in (None, "") else [value])
        return SecretSummary(count=len(values), fingerprints=[self.fingerprint(str(v)) for v in values]).model_dump()

    def settings(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``doc`` (a full or partial settings document) with every secret summarised.

        A partial document (domain or account overrides) shows only the secrets it sets.
        """
        out = copy.deepcopy(doc)
        for path in self.paths:
            parent: Any = out
            for name in path[:-1]:
                parent = parent.get(name) if isinstance(parent, dict) else None
            if isinstance(parent, dict) and path[-1] in parent:
                parent[path[-1]] = self.summary(parent[path[-1]])
        return out

    def audit_state(self, state: Any) -> Any:
        """What an audit record may keep of an object's state (R-ADM-3, R-ADM-5): a pydantic model
        or a JSON-like value, with every secret setting shown as its summary (a changed SRS key
        shows as a changed fingerprint) and any other field named like a secret (a password or
        its hash, a TOTP seed, an API key's hash, a private key) replaced by ``[redacted]``."""
        if state is None:
            return None
        if isinstance(state, BaseModel):
            state = state.model_dump(mode="json")
        if isinstance(state, dict) and any(name in state for name in MailSettings.model_fields):
            state = self.settings(state)
        return _scrub(state)

    def attributes(self, attributes: dict[str, str]) -> dict[str, str]:
        return {
            name: REDACTED if any(word in name.lower() for word in SECRET_ATTRIBUTE_WORDS) else value
            for name, value in attributes.items()
        }


def _is_summary(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"count", "fingerprints"}


# An object's field whose name says it may hold a secret (a key's own field, "key" or "*_key",
# not "key_type"): its value never reaches an audit record.
SECRET_FIELD_WORDS = ("password", "secret", "token", "hash", "seed", "private", "code")


def secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_FIELD_WORDS) or lowered == "key" or lowered.endswith("_key")


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > 32:
        return REDACTED  # nothing an API object holds is this deep
    if isinstance(value, dict):
        return {
            str(k): v if _is_summary(v) else (REDACTED if secret_name(str(k)) else _scrub(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v, depth + 1) for v in value]
    return value


def _get(doc: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = doc
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return False, None
        node = node[name]
    return True, node


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = doc
    for name in path[:-1]:
        child = node.get(name)
        if not isinstance(child, dict):
            child = node[name] = {}
        node = child
    node[path[-1]] = value


def _drop(doc: dict[str, Any], path: tuple[str, ...]) -> None:
    present, _ = _get(doc, path)
    if not present:
        return
    node = doc
    for name in path[:-1]:
        node = node[name]
    del node[path[-1]]


def keep_unchanged_secrets(incoming: dict[str, Any], stored: dict[str, Any], replace: bool) -> dict[str, Any]:
    """The document to store, given what a client sent for a scope and what the scope holds.

    A secret sent as a summary object (what a GET showed, sent back in a read-modify-write) means
    "unchanged". On a replace (PUT), a secret left out also keeps its stored value: a client that
    can never read a secret must not erase it by omission; to clear it, send an empty value.
    """
    out = copy.deepcopy(incoming)
    for path in secret_paths():
        present, value = _get(out, path)
        echoed = present and isinstance(value, dict)
        if echoed:
            _drop(out, path)
        if replace and (echoed or not present):
            had, old = _get(stored, path)
            if had:
                _set(out, path, old)
    return out
