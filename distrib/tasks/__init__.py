"""Built-in tasks, by name, and loading a user's own task from "package.module:factory"."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from distrib.tasks import rl
from distrib.tasks.autoencoder import Autoencoder
from distrib.tasks.base import Batch, Models, Task
from distrib.tasks.classify import Classify
from distrib.tasks.gan import GAN
from distrib.tasks.lm import LanguageModel

BUILTIN: dict[str, Callable[..., Task]] = {
    "classify": Classify,
    "autoencoder": Autoencoder,
    "gan": GAN,
    "rl": rl.ReinforcementLearning,
    "rl-on-policy": rl.on_policy,
    "lm": LanguageModel,
}


def load(spec: str, seed: int = 0) -> Task:
    """A built-in task by name, or a user's factory given as "package.module:factory", called with seed=..."""
    if spec in BUILTIN:
        return BUILTIN[spec](seed=seed)
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ValueError(
            f"unknown task {spec!r}: use one of {', '.join(BUILTIN)} or 'package.module:factory' for your own"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"task {spec!r}: cannot import {module_name!r} ({error}); is it on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"task {spec!r}: {module_name} has no callable {attr!r}")
    try:
        inspect.signature(factory).bind(seed=seed)
    except TypeError as error:  # e.g. os:system; an error inside a real factory stays its own traceback
        raise ValueError(
            f"task {spec!r}: {attr} is not a task factory: calling it with seed={seed} fails ({error}); "
            "a factory takes seed= and returns a Task (see distrib/tasks/base.py)"
        ) from None
    except ValueError:
        pass  # no signature to read (some builtins): calling it will tell
    task = factory(seed=seed)
    missing = [
        name
        for name in ("phases", "build", "collect", "validation", "apply", "targets", "loss", "evaluate")
        if not hasattr(task, name)
    ]
    if missing:
        raise ValueError(f"task {spec!r} lacks {', '.join(missing)}: see distrib/tasks/base.py for the protocol")
    return task


__all__ = ["BUILTIN", "Batch", "Models", "Task", "load"]
