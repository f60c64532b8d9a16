"""Getting configuration into a flow: a saved block by name, or the defaults, plus overrides.

Flow parameters never carry secrets: they name a saved block (whose SecretStr fields stay in
Prefect's block store) and may override plain fields. Overrides are validated like the
block itself, and a bad value becomes a one-line error naming the field, before any call.
"""

from __future__ import annotations

from typing import TypeVar

from prefect.blocks.core import Block
from pydantic import ValidationError

from tasks.core.errors import PipelineInputError, one_line

B = TypeVar("B", bound=Block)


def load_config(cls: type[B], block_name: str | None = None, **overrides) -> B:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        base = cls.load(block_name) if block_name else cls()
        if not overrides:
            return base
        data = base.model_dump(exclude={"block_document_id", "block_document_name", "block_type_slug"}, mode="python")
        for k, v in data.items():  # keep secrets as SecretStr, not their masked dump
            if hasattr(getattr(base, k, None), "get_secret_value"):
                data[k] = getattr(base, k)
        return cls.model_validate({**data, **overrides})
    except ValidationError as exc:
        raise PipelineInputError(one_line(exc, cls.__name__)) from None
    except ValueError as exc:
        if "Unable to find block document" in str(exc):
            raise PipelineInputError(f"no saved {cls.__name__} block named {block_name!r}") from None
        raise
