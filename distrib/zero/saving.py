"""ZeroOffloadOptimizer's state dicts: this rank's shard (sharded), the whole in torch.optim.AdamW's form
(consolidated, on rank 0), and loading either, or torch's own Adam(W) state, at any world size."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distrib.zero.groups import TORCH_GROUP, groups_out, load_groups
from distrib.zero.layout import gather, per_parameter, scatter_


class StateDicts:
    """The state-dict methods of ZeroOffloadOptimizer (a mixin over its flat layout, shard and moments)."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the state; loads back only at the same rank and world size (like torch: live tensors).

        consolidated_state_dict() gives the form that loads at any world size and into torch.optim.AdamW.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():  # torch.optim's hooks, as it runs them
            pre_hook(self)
        self._wait()
        meta = {"world_size": self.comm.size, "rank": self.comm.rank, "step": self._steps}
        meta["shapes"] = [tuple(s) for s in self.layout.shapes]
        state = {"master": self._master_shard(), "exp_avg": self._exp_avg, "exp_avg_sq": self._exp_avg_sq}
        saved = {"zero": meta, "state": state, "param_groups": groups_out(self.param_groups)}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            saved = post_hook(self, saved) or saved
        return saved

    def consolidated_state_dict(self) -> dict[str, Any] | None:
        """The whole state in torch.optim.AdamW's format, on rank 0 (None elsewhere); every rank must call it.

        A bf16/fp16 model's fp32 master weights ride along as state key "master" (torch keeps it as it is).
        """
        self._wait()
        names = {"exp_avg": self._exp_avg, "exp_avg_sq": self._exp_avg_sq}
        if self._flat.dtype != torch.float32:
            names["master"] = self._master_shard()
        # Through the communicator's device (NCCL's GPU, else the CPU): every rank briefly holds the whole.
        full = {
            name: gather(self.comm, self.layout, s.to(self.comm.device), self.algorithm) for name, s in names.items()
        }
        if self.comm.rank != 0:
            return None
        step = torch.tensor(float(self._steps))
        state = {i: {"step": step.clone(), **{k: v[i] for k, v in full.items()}} for i in range(len(self._params))}
        groups = [{**TORCH_GROUP, "decoupled_weight_decay": self.adamw, **g} for g in groups_out(self.param_groups)]
        return {"state": state if self._steps else {}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state_dict() at the same rank and world size, or consolidated_state_dict() (or AdamW's) at any.

        Every rank passes the whole consolidated dict. Load the model's weights too: the parameters are not
        gathered here.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        self._wait()
        load_groups(self.param_groups, state_dict["param_groups"], self.adamw)
        if "zero" in state_dict:
            self._load_sharded(state_dict["zero"], state_dict["state"])
        else:
            self._load_consolidated(state_dict["state"])
        # A delayed run saves its master one update ahead of its model: the next step publishes it first.
        self._unpublished = self._worker is not None and self._master is not None and self._steps > 0
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_sharded(self, meta: dict[str, Any], state: dict[str, Tensor]) -> None:
        here = {"world_size": self.comm.size, "rank": self.comm.rank, "shapes": [tuple(s) for s in self.layout.shapes]}
        if any(meta[k] != v for k, v in here.items()):
            raise ValueError(
                f"this sharded state was saved by rank {meta['rank']} of {meta['world_size']} for "
                f"{len(meta['shapes'])} parameters; this is rank {self.comm.rank} of {self.comm.size} with "
                f"{len(self._params)}. A sharded state loads only where it was saved: save "
                "consolidated_state_dict() to change the world size"
            )
        self._master_shard().copy_(state["master"])
        self._exp_avg.copy_(state["exp_avg"])
        self._exp_avg_sq.copy_(state["exp_avg_sq"])
        self._steps = meta["step"]

    def _load_consolidated(self, state: dict[int, dict[str, Tensor]]) -> None:
        steps = {int(entry["step"]) for entry in state.values()}
        if len(steps) > 1:
            raise ValueError(f"the saved step counts differ across parameters ({sorted(steps)}); ZeRO keeps one")
        if state and (missing := [i for i in range(len(self._params)) if i not in state]):
            raise ValueError(
                f"the saved state has no entry for parameter(s) {missing[:5]} (torch.optim makes one at a parameter's "
                f"first gradient) and step {min(steps)} for the others: ZeRO keeps one step count for all. Load it "
                "into torch.optim.AdamW, or save it once every parameter has had a gradient"
            )
        self._steps = steps.pop() if steps else 0
        targets = {"exp_avg": self._exp_avg.zero_(), "exp_avg_sq": self._exp_avg_sq.zero_()}
        if any("master" in entry for entry in state.values()):  # those without one keep their current weights
            targets["master"] = self._master_shard().copy_(self._own)
        elif self._master is not self._own:
            self._master = None  # read from the parameters at the next step, whenever the model is loaded
        for name, mine in targets.items():
            scatter_(self.layout, self.comm.rank, per_parameter(state, name, self.layout.shapes), mine)
