"""CartPole in numpy, many carts stepped at once: the classic control problem without a gym dependency.

The dynamics, thresholds and rewards are those of Barto, Sutton and Anderson (1983) as Gym's CartPole-v1
writes them: a push of 10 N left or right every 0.02 s, +1 reward per step, the episode over when the pole
leans past 12 degrees or the cart leaves [-2.4, 2.4], and cut off after 500 steps.
"""

from __future__ import annotations

import math

import numpy as np

GRAVITY = 9.8
CART_MASS = 1.0
POLE_MASS = 0.1
POLE_HALF_LENGTH = 0.5
FORCE = 10.0
TAU = 0.02  # seconds per step, explicit Euler
X_LIMIT = 2.4
THETA_LIMIT = 12 * 2 * math.pi / 360
MAX_STEPS = 500  # CartPole-v1's time limit, so the best return is 500


def reset(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    """n starting states [x, x_dot, theta, theta_dot], each uniform in [-0.05, 0.05)."""
    return rng.uniform(-0.05, 0.05, size=(n, 4))


def step(states: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One step of every cart: action 1 pushes right, 0 left; returns the next states and which fell."""
    x, x_dot, theta, theta_dot = states.T
    force = np.where(actions == 1, FORCE, -FORCE)
    cos, sin = np.cos(theta), np.sin(theta)
    total_mass = CART_MASS + POLE_MASS
    temp = (force + POLE_MASS * POLE_HALF_LENGTH * theta_dot**2 * sin) / total_mass
    theta_acc = (GRAVITY * sin - cos * temp) / (POLE_HALF_LENGTH * (4 / 3 - POLE_MASS * cos**2 / total_mass))
    x_acc = temp - POLE_MASS * POLE_HALF_LENGTH * theta_acc * cos / total_mass
    x, x_dot = x + TAU * x_dot, x_dot + TAU * x_acc
    theta, theta_dot = theta + TAU * theta_dot, theta_dot + TAU * theta_acc
    fell = (np.abs(x) > X_LIMIT) | (np.abs(theta) > THETA_LIMIT)
    return np.stack([x, x_dot, theta, theta_dot], axis=1), fell
