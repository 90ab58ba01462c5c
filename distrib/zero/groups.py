"""ZeRO's param groups: torch.optim.AdamW's ranges checked, and the groups as a state dict holds them."""

from __future__ import annotations

import numbers
from typing import Any

import torch

HYPER = ("lr", "betas", "eps", "weight_decay")
# torch.optim.AdamW's own group keys, so a consolidated state dict loads there as it is.
TORCH_GROUP = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False}


def check_flags(where: str = "", **flags: Any) -> None:
    """torch.optim.AdamW's switches ZeRO's step does not have, refused (`where`: in a param group, else given to the
    constructor); foreach and fused are speed options (the CPU step is always fused)."""
    for name, value in flags.items():
        if value:
            raise ValueError(f"{name}=True{where}: ZeroOffloadOptimizer has no {name}; leave it out")


def value(x: Any) -> Any:
    """A hyperparameter as the CPU step reads it: torch takes NumPy scalars and one-element tensors too."""
    if isinstance(x, (tuple, list)):  # betas
        return tuple(value(b) for b in x)
    if isinstance(x, torch.Tensor) and x.numel() == 1 or isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    return x


def check_group(group: dict[str, Any], adamw: bool) -> None:
    """torch.optim.AdamW's ranges, and none of torch's settings that would change the step ignored; the value and
    the fix in the message."""
    check_flags(" in a param group", **{name: group.get(name) for name in ("amsgrad", "maximize", "differentiable")})
    decoupled = group.get("decoupled_weight_decay", adamw)
    if bool(decoupled) != adamw:
        raise ValueError(
            f"decoupled_weight_decay={decoupled!r} in a param group, but the optimizer was built with adamw={adamw}; "
            f"build it with adamw={bool(decoupled)} (Adam{'W' if decoupled else ''}'s weight decay)"
        )

    def number(x: Any) -> bool:
        x = value(x)
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and x >= 0  # also rejects NaN

    for name in ("lr", "eps", "weight_decay"):
        if not number(group[name]):
            raise ValueError(f"{name} must be a float >= 0, got {group[name]!r}")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(number(b) and value(b) < 1 for b in betas)):
        raise ValueError(f"betas must be two floats in [0, 1), e.g. (0.9, 0.999); got {betas!r}")


def groups_out(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups' hyperparameters with parameter indices counted across groups, as torch.optim saves them."""
    groups, first = [], 0
    for group in param_groups:
        count = len(group["params"])
        groups.append({**{k: group[k] for k in HYPER}, "params": list(range(first, first + count))})
        first += count
    return groups


def load_groups(param_groups: list[dict[str, Any]], saved: list[dict[str, Any]], adamw: bool) -> None:
    """Take the saved groups' hyperparameters, once their sizes match these groups' and their values check."""
    for g, old in enumerate(saved):
        if missing := [k for k in HYPER if k not in old]:
            raise ValueError(f"saved param group {g} has no {', '.join(missing)}: not a state dict of Adam or AdamW")
        check_group(old, adamw)
    sizes, here = [len(g["params"]) for g in saved], [len(g["params"]) for g in param_groups]
    if sizes != here:
        raise ValueError(
            f"the saved param groups hold {sizes} parameters, this optimizer's {here}; "
            "build the optimizer over the same model and groups as the one saved"
        )
    for group, old in zip(param_groups, saved):
        group.update({k: tuple(old[k]) if k == "betas" else old[k] for k in HYPER})
