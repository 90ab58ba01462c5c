"""Reinforcement learning: a policy balances CartPole, learning from the returns of its own episodes.

Each epoch every rank plays its share of the epoch's episodes, all ranks gather them into one replay memory,
and the loop trains on transitions sampled from it. Targets come from future rewards: each step's discounted
return-to-go, less the memory's mean return-to-go at the same time step, is the advantage of the action taken.
The loss is PPO's clipped policy gradient, whose probability ratio to the policy that acted lets the default,
off-policy memory (the newest `memory` transitions, over epochs) be reused; on-policy, it holds one epoch's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from distrib.comm import Communicator
from distrib.data import split
from distrib.device import where
from distrib.tasks import cartpole
from distrib.tasks.base import Batch, Models, unwrap

# Columns of a transition row in the memory.
STATE, ACTION, LOGP, RETURN, TIME = slice(0, 4), 4, 5, 6, 7


class ReinforcementLearning:
    """Policy gradient on CartPole; val_return is the mean return of greedy episodes (the best is 500).

    Each epoch plays `episodes` episodes over all ranks and trains on `samples` transitions drawn from the memory.
    """

    phases = ("policy",)
    defaults = {"epochs": 15}  # CartPole needs about 10 rounds of acting and training to reach 500

    def __init__(
        self,
        seed: int = 0,
        on_policy: bool = False,
        episodes: int = 32,
        memory: int = 8192,
        samples: int = 16384,
        gamma: float = 0.99,
        clip: float = 0.2,
        entropy: float = 0.003,
        val_episodes: int = 16,
    ):
        for name, value in [("episodes", episodes), ("memory", memory), ("samples", samples)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}: 0.99 is usual")
        self.seed, self.on_policy, self.gamma, self.clip, self.entropy = seed, on_policy, gamma, clip, entropy
        self.episodes, self.memory_size, self.samples = episodes, memory, samples
        self._val = (torch.arange(val_episodes),)  # episode numbers; evaluate() plays them greedily
        self._memory = np.zeros((0, TIME + 1))
        self._epoch, self._data = -1, None

    def build(self) -> Models:
        torch.manual_seed(self.seed)
        policy = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
        with torch.no_grad():
            policy[-1].weight.mul_(0.01)  # start near the uniform policy: explore first
        return {"policy": policy}

    def collect(self, epoch: int, models: Models, comm: Communicator) -> Batch:
        """Play this epoch's episodes (this rank's share), gather them everywhere, sample from the memory."""
        if epoch == self._epoch:  # the epoch's data once: a resumed run takes it from the checkpoint, no replay
            return self._data
        start, stop = split(self.episodes, comm.rank, comm.size)
        mine = play(unwrap(models["policy"]), [(self.seed, 0, epoch, e) for e in range(start, stop)], greedy=False)
        rows = [_transitions(e, self.gamma) for everyone in comm.allgather_object(mine) for e in everyone]
        fresh = np.concatenate(rows)
        memory = fresh if self.on_policy else np.concatenate([self._memory, fresh])
        self._memory = memory[-self.memory_size :]  # bounded: the oldest transitions go first
        rng = np.random.default_rng((self.seed, epoch))
        # A fixed number of samples, so every epoch has as many steps as the schedule was sized for on epoch 0.
        picked = self._memory[rng.integers(0, len(self._memory), self.samples)]
        self._data = (
            torch.tensor(picked[:, STATE], dtype=torch.float32),
            torch.tensor(picked[:, ACTION], dtype=torch.int64),
            torch.tensor(picked[:, LOGP], dtype=torch.float32),
            torch.tensor(_advantages(self._memory, picked), dtype=torch.float32),
        )
        self._epoch = epoch
        return self._data

    def state_dict(self) -> dict:
        """The replay memory and this epoch's sample: a resumed run trains on what the interrupted one would."""
        return {"epoch": self._epoch, "memory": torch.from_numpy(self._memory.copy()), "data": self._data}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._memory, self._data = state["epoch"], state["memory"].numpy(), state["data"]

    def validation(self) -> Batch:
        return self._val

    def apply(self, phase: str, models: Models, batch: Batch) -> torch.Tensor:
        return models[phase](batch[0])  # action logits

    def targets(self, phase: str, models: Models, batch: Batch, guesses: torch.Tensor) -> torch.Tensor:
        """Per transition: the action taken, its log-probability when taken, and its advantage from future rewards."""
        return torch.stack([batch[1].to(batch[2].dtype), batch[2], batch[3]], dim=1)

    def loss(self, phase: str, guesses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        actions, old_logp, advantage = targets[:, 0].long(), targets[:, 1], targets[:, 2]
        logp_all = F.log_softmax(guesses, dim=1)
        ratio = torch.exp(logp_all.gather(1, actions[:, None])[:, 0] - old_logp)
        gain = torch.minimum(ratio * advantage, ratio.clamp(1 - self.clip, 1 + self.clip) * advantage)
        entropy = -(logp_all.exp() * logp_all).sum(1)
        return -gain - self.entropy * entropy

    def evaluate(self, models: Models, batch: Batch) -> dict[str, float | torch.Tensor]:
        seeds = [(self.seed, 1, int(e)) for e in batch[0]]  # never a training episode's seed
        returns = [len(e) for e in play(unwrap(models["policy"]), seeds, greedy=True)]
        return {"return": float(sum(returns)), "count": float(len(returns))}


def play(policy: nn.Module, seeds: Sequence[tuple[int, ...]], greedy: bool) -> list[np.ndarray]:
    """One CartPole episode per seed, all stepped together; each as rows [state (4), action, log-probability].

    An episode's start and its action draws come from its own seed alone, so which rank plays it, and beside
    which others, does not change it. The carts are numpy on the CPU; only the states visit the policy's device.
    """
    device = where(policy)
    rngs = [np.random.default_rng(seed) for seed in seeds]
    states = np.array([cartpole.reset(rng)[0] for rng in rngs]).reshape(len(seeds), 4)
    draws = np.array([rng.random(cartpole.MAX_STEPS) for rng in rngs]).reshape(len(seeds), cartpole.MAX_STEPS)
    rows = np.zeros((len(seeds), cartpole.MAX_STEPS, 6))
    lengths = np.zeros(len(seeds), dtype=np.int64)
    alive = np.arange(len(seeds))
    for t in range(cartpole.MAX_STEPS):
        if not len(alive):
            break
        with torch.no_grad():
            inputs = torch.as_tensor(states[alive], dtype=torch.float32).to(device)
            logp = F.log_softmax(policy(inputs), dim=1).double().cpu().numpy()
        actions = logp.argmax(1) if greedy else (draws[alive, t] < np.exp(logp[:, 1])).astype(np.int64)
        rows[alive, t, :4] = states[alive]
        rows[alive, t, 4] = actions
        rows[alive, t, 5] = logp[np.arange(len(alive)), actions]
        lengths[alive] += 1
        states[alive], fell = cartpole.step(states[alive], actions)
        alive = alive[~fell]
    return [rows[i, : lengths[i]] for i in range(len(seeds))]


def _transitions(episode: np.ndarray, gamma: float) -> np.ndarray:
    """An episode's rows with its discounted return-to-go and time step appended: CartPole pays 1 per step."""
    rewards = np.ones(len(episode))
    returns = np.zeros(len(episode))
    future = 0.0
    for t in range(len(episode) - 1, -1, -1):
        future = rewards[t] + gamma * future
        returns[t] = future
    return np.column_stack([episode, returns, np.arange(len(episode))])


def _advantages(memory: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """Return-to-go less the memory's mean at the same time step, over the memory's spread of that difference.

    The time-step baseline also removes the shrinking of returns near the 500-step cut-off, which says nothing
    about the action.
    """
    time = memory[:, TIME].astype(np.int64)
    counts = np.bincount(time, minlength=cartpole.MAX_STEPS)
    baseline = np.bincount(time, memory[:, RETURN], minlength=cartpole.MAX_STEPS) / np.maximum(counts, 1)
    spread = (memory[:, RETURN] - baseline[time]).std() + 1e-8
    return (picked[:, RETURN] - baseline[picked[:, TIME].astype(np.int64)]) / spread


def on_policy(seed: int = 0) -> ReinforcementLearning:
    """The on-policy variant: the memory holds only the current epoch's episodes."""
    return ReinforcementLearning(seed=seed, on_policy=True)
