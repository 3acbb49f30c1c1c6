"""Declarative trainable spec: which parts (and which parameter name patterns) a stage trains."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from kangaroo.modules.adapters import ADAPTER_MARK
from kangaroo.modules.model import PART_NAMES, KangarooModel


def check_trainable_spec(trainable: dict[str, bool], patterns: dict[str, bool] | None = None) -> None:
    """Static checks that need no model: part names are known and values are booleans."""
    unknown = sorted(set(trainable) - set(PART_NAMES))
    if unknown:
        raise ValueError(f"trainable: unknown part(s) {unknown}; parts are {list(PART_NAMES)}")
    for name, value in {**trainable, **(patterns or {})}.items():
        if not isinstance(value, bool):
            raise ValueError(f"trainable entry {name!r} must be true or false, got {value!r}")


def apply_trainable(model: KangarooModel, trainable: dict[str, bool],
                    patterns: dict[str, bool] | None = None) -> list[dict]:
    """Sets ``requires_grad`` on every parameter and returns one row per part:
    ``{"part", "params", "trainable"}``.

    ``trainable`` names every part that has parameters (``{"vision_tower": True, ...}``);
    ``patterns`` then override single parameters by glob on their full name, in order
    (``{"language_model.model.embed_tokens.*": True}``). An entry that matches nothing, and a
    part with parameters that the spec leaves out, are errors: nothing is frozen by accident.
    """
    check_trainable_spec(trainable, patterns)
    parts = model.parts()
    for name, flag in trainable.items():
        part = parts[name]
        if part is None or not any(True for _ in part.parameters()):
            raise ValueError(f"trainable: part {name!r} has no parameters in this model "
                             f"({'absent' if part is None else 'parameter-free'}); remove the entry")
        part.requires_grad_(flag)
    unsaid = [name for name, part in parts.items()
              if part is not None and name not in trainable and any(True for _ in part.parameters())]
    if unsaid:
        raise ValueError(f"trainable: the spec does not say whether {unsaid} train; list every part with parameters")
    named = dict(model.named_parameters())
    for n, parameter in named.items():  # adapters train (patterns may still say otherwise)
        if ADAPTER_MARK in n:
            parameter.requires_grad_(True)
    for pattern, flag in (patterns or {}).items():
        matched = [n for n in named if fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"trainable pattern {pattern!r} matches no parameter name "
                             f"(names look like {next(iter(named))!r})")
        for n in matched:
            named[n].requires_grad_(flag)
    return trainable_table(model)


def trainable_table(model: KangarooModel) -> list[dict]:
    """One row per part (its own weights) and one per part with adapters (``<part> adapters``)."""
    rows = []
    for name, part in model.parts().items():
        named = list(part.named_parameters()) if isinstance(part, nn.Module) else []
        for label, params in ((name, [p for n, p in named if ADAPTER_MARK not in n]),
                              (f"{name} adapters", [p for n, p in named if ADAPTER_MARK in n])):
            if params or label == name:
                rows.append({"part": label, "params": sum(p.numel() for p in params),
                             "trainable": sum(p.numel() for p in params if p.requires_grad)})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'part':<20}{'parameters':>14}{'trainable':>14}"]
    for row in rows:
        lines.append(f"{row['part']:<20}{row['params']:>14,}{row['trainable']:>14,}")
    lines.append(f"{'total':<20}{sum(r['params'] for r in rows):>14,}{sum(r['trainable'] for r in rows):>14,}")
    return "\n".join(lines)
