"""The autoencoder, GAN and RL tasks: each learns at 2 ranks, any world size trains the same weights, and the
pieces (CartPole, returns-to-go, the replay memory, the GAN's phases and its energy distance) against references."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

import distrib
from distrib import tasks
from distrib.comm.local import LocalCommunicator
from distrib.tasks import cartpole, rl
from distrib.tasks.autoencoder import Autoencoder
from distrib.tasks.gan import GAN, ring
from tests.launching import run, run_ranks

TRAIN = ["-m", "distrib.train", "--no-progress"]


def train_run(tmp_path, ranks: int, *args: str) -> list[dict[str, float]]:
    """python -m distrib.train at `ranks` ranks (mpiexec; 1: a plain process); the metrics of each epoch."""
    out = tmp_path / f"{ranks}-{'-'.join(args).replace(':', '-')}"
    cmd = [*TRAIN, "--out", str(out), *args]
    result = run_ranks("mpiexec", ranks, cmd, timeout=240) if ranks > 1 else run([sys.executable, *cmd], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# Each task's learning criterion, at 2 ranks with the CLI's defaults (RL: 15 epochs).


def test_autoencoder_learns(tmp_path):
    epochs = train_run(tmp_path, 2, "--task", "autoencoder")
    losses = [e["val_loss"] for e in epochs]
    assert losses[-1] < 0.6 * losses[0], losses
    # Against the best linear code of the same width: PCA of the training points, by SVD.
    task = Autoencoder()
    (train,), (val,) = task.collect(0, {}, LocalCommunicator()), task.validation()
    basis = torch.linalg.svd(train, full_matrices=False).Vh[: task.code]
    pca = float(((val @ basis.T @ basis - val) ** 2).mean())
    assert losses[-1] < 0.5 * pca, (losses, pca)


def test_gan_learns(tmp_path):
    epochs = train_run(tmp_path, 2, "--task", "gan")
    distances = [e["val_energy_distance"] for e in epochs]
    # A sampler missing one of the eight modes scores about 0.05 (test_energy_distance_tells_a_missing_mode).
    assert distances[-1] < 0.04, distances
    untrained = GAN()
    with torch.no_grad():
        start = untrained.evaluate(untrained.build(), untrained.validation())
    assert start["energy_distance"] / start["count"] > 1.0


def test_rl_learns(tmp_path):
    epochs = train_run(tmp_path, 2, "--task", "rl", "--epochs", "15")
    returns = [e["val_return"] for e in epochs]
    assert all(e["val_count"] == 16 for e in epochs)  # every greedy validation episode counted once
    assert np.mean(returns[-3:]) >= 400, returns  # of 500; the untrained greedy policy falls in about 10 steps
    task = rl.ReinforcementLearning()
    with torch.no_grad():
        start = task.evaluate(task.build(), task.validation())
    assert start["return"] / start["count"] < 50


# Any world size trains the same weights: the noise, the episodes and the replay memory follow the global batch.


def tiny_gan(seed: int = 0) -> GAN:
    return GAN(seed=seed, train_size=640, val_size=64, partners=2)


def tiny_rl(seed: int = 0) -> rl.ReinforcementLearning:
    return rl.ReinforcementLearning(seed=seed, episodes=6, memory=600, samples=640, val_episodes=3)


def tiny_autoencoder(seed: int = 0) -> Autoencoder:
    return Autoencoder(seed=seed, train_size=640, val_size=64)


@pytest.mark.parametrize("factory", ["tiny_gan", "tiny_rl", "tiny_autoencoder"])
def test_any_world_size_gives_the_same_weights(tmp_path, factory):
    args = ("--task", f"tests.test_tasks:{factory}", "--epochs", "2", "--batch-size", "100")
    one, two = (trained_weights(tmp_path, ranks, *args) for ranks in (1, 2))
    assert one.keys() == two.keys() and one
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def trained_weights(tmp_path, ranks: int, *args: str) -> dict[str, torch.Tensor]:
    """Every tensor of model.pt by one flat name; a multi-phase run saves one state dict per phase."""
    train_run(tmp_path, ranks, *args)
    saved = torch.load(tmp_path / f"{ranks}-{'-'.join(args).replace(':', '-')}" / "model.pt", weights_only=True)
    phases = saved if all(isinstance(v, dict) for v in saved.values()) else {"model": saved}
    return {f"{phase}.{name}": t for phase, state in phases.items() for name, t in state.items()}


# CartPole, episodes, returns-to-go and the replay memory.


def gym_step(state, action):
    """One step of Gym's CartPole-v1, one cart at a time, written out from its published source."""
    x, x_dot, theta, theta_dot = state
    force = 10.0 if action == 1 else -10.0
    costheta, sintheta = math.cos(theta), math.sin(theta)
    temp = (force + 0.05 * theta_dot**2 * sintheta) / 1.1
    thetaacc = (9.8 * sintheta - costheta * temp) / (0.5 * (4.0 / 3.0 - 0.1 * costheta**2 / 1.1))
    xacc = temp - 0.05 * thetaacc * costheta / 1.1
    x, x_dot = x + 0.02 * x_dot, x_dot + 0.02 * xacc
    theta, theta_dot = theta + 0.02 * theta_dot, theta_dot + 0.02 * thetaacc
    done = x < -2.4 or x > 2.4 or theta < -12 * 2 * math.pi / 360 or theta > 12 * 2 * math.pi / 360
    return [x, x_dot, theta, theta_dot], done


def test_cartpole_steps_like_gym():
    rng = np.random.default_rng(0)
    states = rng.uniform([-2.4, -2, -0.21, -2], [2.4, 2, 0.21, 2], size=(200, 4))
    actions = rng.integers(0, 2, 200)
    following, fell = cartpole.step(states, actions)
    for state, action, got, got_fell in zip(states, actions, following, fell):
        expected, done = gym_step(state, action)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
        assert got_fell == done
    assert 0 < fell.sum() < 200  # both outcomes were checked


def test_starts_are_small_and_pushing_one_way_falls_fast():
    states = cartpole.reset(np.random.default_rng(1), 100)
    assert states.shape == (100, 4) and np.abs(states).max() <= 0.05
    steps = np.zeros(100, dtype=int)
    alive = np.ones(100, dtype=bool)
    for _ in range(50):
        states, fell = cartpole.step(states, np.ones(100, dtype=int))
        steps += alive
        alive &= ~fell
    assert not alive.any() and steps.max() < 15  # the pole tips over backwards within a third of a second


class Always(nn.Module):
    """A policy that prefers one action with a fixed probability, for episodes with known statistics."""

    def __init__(self, p_right: float) -> None:
        super().__init__()
        self.logits = torch.log(torch.tensor([1 - p_right, p_right]))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(states), 2)


def test_episodes_do_not_depend_on_who_plays_them():
    policy = rl.ReinforcementLearning().build()["policy"]
    seeds = [(0, 0, 3, e) for e in range(7)]
    together = rl.play(policy, seeds, greedy=False)
    apart = rl.play(policy, seeds[:2], greedy=False) + rl.play(policy, seeds[2:], greedy=False)
    assert [len(e) for e in together] == [len(e) for e in apart]
    for a, b in zip(together, apart):
        np.testing.assert_array_equal(a[:, :5], b[:, :5])  # states and actions
        np.testing.assert_allclose(a[:, 5], b[:, 5], rtol=1e-6)  # log-probabilities
    assert len({len(e) for e in together}) > 1  # different seeds, different episodes


def test_episode_rows_hold_the_policy_log_probability():
    (episode,) = rl.play(Always(0.8), [(5,)], greedy=False)
    assert 1 <= len(episode) <= cartpole.MAX_STEPS
    expected = np.where(episode[:, 4] == 1, math.log(0.8), math.log(0.2))
    np.testing.assert_allclose(episode[:, 5], expected, rtol=1e-6)
    (greedy,) = rl.play(Always(0.8), [(5,)], greedy=True)
    assert (greedy[:, 4] == 1).all()


def test_return_to_go_is_the_discounted_sum_of_future_rewards():
    episode = np.zeros((37, 6))
    rows = rl._transitions(episode, gamma=0.9)
    t = np.arange(37)
    np.testing.assert_allclose(rows[:, rl.RETURN], (1 - 0.9 ** (37 - t)) / (1 - 0.9))  # geometric series
    np.testing.assert_array_equal(rows[:, rl.TIME], t)


def test_collect_is_the_same_for_the_same_epoch_and_the_memory_is_bounded():
    comm, task = LocalCommunicator(), rl.ReinforcementLearning(episodes=4, memory=150, samples=64)
    models = task.build()
    first = task.collect(0, models, comm)
    assert task.collect(0, models, comm) is first  # train.py sizes its schedule on epoch 0, then the loop asks again
    assert all(len(t) == 64 for t in first)  # a fixed sample from the memory: every epoch has the same steps
    sizes = []
    for epoch in range(1, 6):
        task.collect(epoch, models, comm)
        sizes.append(len(task._memory))
    assert max(sizes) == 150 and sizes == sorted(sizes)  # kept, up to the bound


def test_on_policy_memory_holds_only_this_epochs_episodes():
    comm, task = LocalCommunicator(), tasks.load("rl-on-policy")
    models = task.build()
    for epoch in range(3):
        task.collect(epoch, models, comm)
        starts = int((task._memory[:, rl.TIME] == 0).sum())
        assert starts == task.episodes  # one start per episode of this epoch, none older


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"episodes": 0}, "episodes must be a whole number >= 1, got 0"),
        ({"memory": 2.5}, "memory must be a whole number >= 1, got 2.5"),
        ({"samples": -1}, "samples must be a whole number >= 1, got -1"),
        ({"gamma": 1.5}, "gamma must be in (0, 1], got 1.5"),
    ],
)
def test_rl_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError) as error:
        rl.ReinforcementLearning(**kwargs)
    assert message in str(error.value)


# The GAN: each phase trains and synchronises only its own model; the energy distance against references.


def test_each_gan_phase_touches_only_its_own_model():
    task, comm = GAN(train_size=256), LocalCommunicator()
    models = task.build()
    wrapped = {phase: distrib.DistributedDataParallel(m, comm=comm) for phase, m in models.items()}
    batch = [t[:32] for t in task.collect(0, wrapped, comm)]
    for phase, other in (("discriminator", "generator"), ("generator", "discriminator")):
        for m in models.values():
            m.zero_grad(set_to_none=True)
        guesses = task.apply(phase, wrapped, batch)
        task.loss(phase, guesses, task.targets(phase, wrapped, batch, guesses)).sum().backward()
        assert all(p.grad is not None for p in models[phase].parameters()), phase
        assert all(p.grad is None for p in models[other].parameters()), phase
        assert all(p.requires_grad for m in models.values() for p in m.parameters())


def test_discriminator_loss_is_binary_cross_entropy_plus_r1():
    task = GAN(train_size=256)
    models = task.build()
    real, noise = [t[:16] for t in task.collect(0, models, LocalCommunicator())]
    guesses = task.apply("discriminator", models, [real, noise])
    losses = task.loss("discriminator", guesses, task.targets("discriminator", models, [real, noise], guesses))
    d, g = models["discriminator"], models["generator"]
    x = real.clone().requires_grad_(True)
    slope = torch.autograd.grad(d(x).sum(), x)[0].pow(2).sum(1)
    expected = -nn.functional.logsigmoid(d(real))[:, 0] - nn.functional.logsigmoid(-d(g(noise)))[:, 0]
    torch.testing.assert_close(losses, expected + task.r1 / 2 * slope)


class RingSampler(nn.Module):
    """A generator that already samples the ring, from `modes` of its eight modes: a known answer to score."""

    def __init__(self, modes: int = 8, std: float = 0.05) -> None:
        super().__init__()
        self.modes, self.std = modes, std

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        mode = (torch.special.ndtr(noise[:, 0]) * self.modes).floor().clamp(max=self.modes - 1)
        angle = 2 * math.pi * mode / 8
        return 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], 1) + self.std * noise[:, 1:3]


def energy_distance(task: GAN, generator: nn.Module) -> float:
    with torch.no_grad():
        result = task.evaluate({"generator": generator}, task.validation())
    return result["energy_distance"] / result["count"]


def test_energy_distance_matches_all_pairs():
    task = GAN(train_size=8)
    real = task._reference.double()
    torch.manual_seed(0)
    for generator in (RingSampler(), RingSampler(modes=3), RingSampler(std=0.3), nn.Linear(8, 2)):
        with torch.no_grad():
            fake = generator(task.validation()[0]).double()
        n, m = len(fake), len(real)
        direct = (
            2 * torch.cdist(fake, real).mean()
            - torch.cdist(fake, fake).sum() / (n * (n - 1))
            - torch.cdist(real, real).sum() / (m * (m - 1))
        )
        assert energy_distance(task, generator) == pytest.approx(float(direct), abs=0.01)


def test_energy_distance_tells_a_missing_mode():
    task = GAN(train_size=8)
    assert abs(energy_distance(task, RingSampler())) < 0.01
    assert energy_distance(task, RingSampler(modes=7)) > 0.04


def test_the_ring_has_eight_equal_modes_of_radius_two():
    points = ring(8000, torch.Generator().manual_seed(0)).double()
    angle = torch.atan2(points[:, 1], points[:, 0]) / (2 * math.pi / 8)
    mode = angle.round().long() % 8
    assert (angle - angle.round()).abs().max() < 0.25  # every point near one of the eight directions
    assert torch.bincount(mode, minlength=8).min() > 900  # about 1000 each
    assert points.norm(dim=1).mean() == pytest.approx(2.0, abs=0.01)
