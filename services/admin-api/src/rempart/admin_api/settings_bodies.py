"""Typed request bodies for the settings routes, derived from the settings models once.

A settings write carries only what it changes, so every field of these models is optional; the
constraints (``ge``, ``le``, literals) are the settings models' own, so a bad value is refused
before the handler with the field named (``ips.block_minutes``), and the OpenAPI document
describes every section instead of an untyped object. A secret field also takes the summary a
GET showed (R-ADM-3: sent back, it means "unchanged"). Domain and account bodies offer only
what those scopes may override (:data:`rempart.common.config.SCOPED_FIELDS`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from rempart.admin_api.redaction import SecretSummary, is_secret
from rempart.common.config import SCOPED_FIELDS, MailSettings


class _Partial(BaseModel):
    model_config = ConfigDict(extra="forbid")


def partial_model(model: type[BaseModel], name: str, only: dict[str, set[str]] | None = None) -> type[BaseModel]:
    """``model`` with every field optional (default None), sections too; ``only`` keeps those
    sections and fields."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        annotation = info.annotation
        if only is not None and field_name not in only:
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keep: dict[str, set[str]] | None = None if only is None else {f: set() for f in only[field_name]}
            sub = partial_model(annotation, f"{annotation.__name__}Patch" if only is None else
                                f"{annotation.__name__}ScopedPatch", keep)
            fields[field_name] = (sub | None, Field(default=None, description=annotation.__doc__))
            continue
        typed: Any = Annotated[annotation, *info.metadata] if info.metadata else annotation
        if is_secret(info):
            typed = typed | SecretSummary
        fields[field_name] = (typed | None, Field(default=None, description=info.description))
    partial: type[BaseModel] = create_model(  # type: ignore[call-overload]
        name, __base__=_Partial, __doc__=f"Any part of {model.__name__}: what it sets changes, the rest stays.",
        **fields,
    )
    return partial


MailSettingsPatch = partial_model(MailSettings, "MailSettingsPatch")
ScopedSettingsPatch = partial_model(MailSettings, "ScopedSettingsPatch", SCOPED_FIELDS)


def as_document(body: BaseModel) -> dict[str, Any]:
    """The settings document a body stands for: only what the client sent (``null`` included, so
    that validation refuses it rather than the write dropping it silently)."""
    return body.model_dump(mode="json", exclude_unset=True)
