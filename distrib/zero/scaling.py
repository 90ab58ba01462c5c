"""torch.amp.GradScaler over a sharded step: the skip decision, and the scaler's own record of it, alike on every
rank.

Under DDP the gradients are averaged in backward, so an inf or NaN on one rank reaches all, every rank's scaler
finds it, skips the step and lowers its scale. ZeRO reduces only in step(), so each scaler would see this rank's
gradients alone: one rank would skip while another stepped, and the collectives would pair up across different
steps. The optimizer takes the scaler (GradScaler passes itself to an optimizer that handles scaling), unscales
as the scaler does, and makes every rank's found-inf the maximum over the ranks before the scaler updates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from distrib.comm import Communicator


def found_inf_anywhere(comm: Communicator, scaler: Any, optimizer: torch.optim.Optimizer, reduced: bool) -> bool:
    """Unscale this rank's gradients (unless the script did, with scaler.unscale_), and whether any rank found an inf
    or NaN among its own; the scaler's record of it then says the same on every rank. Collective.

    `reduced`: clip_grad_norm_ already averaged the gradients, which is only right once they were unscaled."""
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.READY:
        if reduced:
            raise RuntimeError(
                "opt.clip_grad_norm_() ran on scaled gradients: with a GradScaler call scaler.unscale_(opt) before "
                "opt.clip_grad_norm_(), as torch's AMP recipe does before clipping"
            )
        scaler.unscale_(optimizer)
    found = list(state["found_inf_per_device"].values())
    local = max((float(f.item()) for f in found), default=0.0)
    anywhere = float(comm.allreduce(torch.tensor([local]), op="max", algorithm="native")[0])
    for f in found:
        f.fill_(anywhere)
    return anywhere > 0
