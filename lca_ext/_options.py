"""The one way LCATracker reads an options group (RuleOptions, StatsOptions):
the group's object, a dict of its fields, or its fields given as keywords of
the tracker, never both forms at once."""
from __future__ import annotations

import dataclasses


def grouped(cls, arg: str, group, shorthands: dict):
    """``cls`` from ``group`` (a cls, a dict of its fields or None) or from the
    ``shorthands`` (the tracker's keywords of the same names; None = not given);
    ``arg`` is the tracker's keyword for the group, named in the errors."""
    given = {k: v for k, v in shorthands.items() if v is not None}
    if group is not None and given:
        raise ValueError(f"lca_ext.LCATracker: give {arg}= or {', '.join(sorted(given))}=, "
                         f"not both (put them into the {cls.__name__})")
    if isinstance(group, cls):
        return group
    if group is not None and not isinstance(group, dict):
        raise TypeError(f"lca_ext.LCATracker: {arg}={group!r}; expected a "
                        f"lca_ext.{cls.__name__} or a dict of its fields")
    fields = {f.name for f in dataclasses.fields(cls)}
    # (init-only names, e.g. a renamed option, are not fields: cls says what they became)
    init_only = set(getattr(cls, "__dataclass_fields__", {})) - fields
    unknown = sorted(set(group or {}) - fields - init_only)
    if unknown:
        raise TypeError(f"lca_ext.LCATracker: {arg} has unknown fields {unknown}; "
                        f"{cls.__name__} has {sorted(fields)}")
    return cls(**(group or given))
