"""Whether a checkpoint fits this run: the same settings, models, optimizers and world size where they matter.

Checked on every rank before anything is loaded, so a resume either takes the whole checkpoint or changes nothing,
and the message says what differs and how to resume anyway.
"""

from __future__ import annotations

import torch

from distrib.checkpoint.state import FORMAT, TrainingState


def mismatch(state: TrainingState, manifest: dict, shared: dict, world_size: int) -> str | None:
    """Why the checkpoint (its manifest and shared file) cannot load into `state` (the fix included), or None."""
    if manifest["format"] != FORMAT:
        return f"it is in checkpoint format {manifest['format']}, this distrib reads {FORMAT}; resume with its version"
    for key, saved in manifest["settings"].items():
        here = state.settings.get(key)
        if saved != here:
            wrote, has = (f"{key} {v}" if v is not None else f"no {key}" for v in (saved, here))
            fix = f"resume with {key} {saved}" if saved is not None else f"resume without {key}"
            return f"it was written with {wrote}, this run has {has}; {fix}"
    if sorted(shared["models"]) != sorted(state.models):
        return f"it holds models {sorted(shared['models'])}, this task has {sorted(state.models)}; use the same task"
    for phase, model in state.models.items():
        trouble = _other_model(shared["models"][phase], model.state_dict())
        if trouble:
            return f"it holds another model ({trouble}); resume with the model that wrote it, or start a new --out"
    kinds = {phase: type(o).__name__ for phase, o in state.optimizers.items()}
    if manifest["optimizers"] != kinds:
        return f"its optimizers are {manifest['optimizers']}, this run's {kinds}; resume with the same optimizer"
    if manifest["sharded"] and manifest["world_size"] != world_size:
        return (
            f"it holds the optimizer shards of {manifest['world_size']} ranks, and a sharded optimizer resumes only "
            f"at the world size that wrote it: launch {manifest['world_size']} ranks"
        )
    for phase, optimizer in state.optimizers.items():
        saved_sd = None if phase in manifest["sharded"] else shared["optimizers"].get(phase)
        if saved_sd is not None:
            saved_groups = [len(g["params"]) for g in saved_sd["param_groups"]]
            groups = [len(g["params"]) for g in optimizer.param_groups]
            if saved_groups != groups:
                return f"its {phase} optimizer has parameter groups of sizes {saved_groups}, this one {groups}"
    return None


def _other_model(saved: dict[str, torch.Tensor], here: dict[str, torch.Tensor]) -> str | None:
    for key in sorted(set(saved) | set(here)):
        if key not in saved or key not in here:
            return f"{key!r} is only {'here' if key in here else 'in the checkpoint'}"
        if saved[key].shape != here[key].shape:
            return f"{key!r} is {tuple(saved[key].shape)} there, {tuple(here[key].shape)} here"
    return None
