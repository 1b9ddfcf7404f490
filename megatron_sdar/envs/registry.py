"""Environment registry: ``make(name, **kwargs)``.

Built-in names (imported lazily so that using one environment never needs another's
dependencies):

=============  ==========================================================  ===========
name           class                                                       needs
=============  ==========================================================  ===========
household      :class:`~megatron_sdar.envs.household.HouseholdEnv`          nothing
alfworld       :class:`~megatron_sdar.envs.alfworld_env.ALFWorldEnv`        alfworld
webshop        :class:`~megatron_sdar.envs.webshop.LocalWebShopEnv`, or     bm25s
               :class:`~megatron_sdar.envs.webshop_http.WebShopHTTPEnv`
               when ``base_url=`` is given
search         :class:`~megatron_sdar.envs.search_qa.SearchQAEnv`           bm25s
twc            :class:`~megatron_sdar.envs.textworld_express.TWCEnv`         textworld-express, Java
cookingworld   :class:`~megatron_sdar.envs.textworld_express.CookingWorldEnv`  textworld-express, Java
=============  ==========================================================  ===========
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from megatron_sdar.envs.base import TextEnv

EnvFactory = Callable[..., TextEnv]

_BUILTIN: dict[str, str] = {
    "household": "megatron_sdar.envs.household:HouseholdEnv",
    "alfworld": "megatron_sdar.envs.alfworld_env:ALFWorldEnv",
    "search": "megatron_sdar.envs.search_qa:SearchQAEnv",
    "twc": "megatron_sdar.envs.textworld_express:TWCEnv",
    "cookingworld": "megatron_sdar.envs.textworld_express:CookingWorldEnv",
}
_REGISTRY: dict[str, EnvFactory | str] = dict(_BUILTIN)


def _webshop_class(**kwargs: Any) -> type[TextEnv]:
    if "base_url" in kwargs:
        from megatron_sdar.envs.webshop_http import WebShopHTTPEnv

        return WebShopHTTPEnv
    from megatron_sdar.envs.webshop import LocalWebShopEnv

    return LocalWebShopEnv


def _webshop(**kwargs: Any) -> TextEnv:
    return _webshop_class(**kwargs)(**kwargs)


_REGISTRY["webshop"] = _webshop


def register(name: str, factory: EnvFactory) -> None:
    """Add an environment: ``factory(**kwargs)`` must return a :class:`TextEnv`."""
    if not callable(factory):
        raise TypeError(f"factory for environment {name!r} must be callable")
    if name in _REGISTRY:
        raise ValueError(f"environment {name!r} is already registered")
    _REGISTRY[name] = factory


def available_envs() -> list[str]:
    return sorted(_REGISTRY)


def env_class(name: str, **kwargs: Any) -> type[TextEnv] | None:
    """The class ``make(name, **kwargs)`` builds, without building it (its module is imported);
    None for a registered factory that is not a class (what it builds is known when it runs)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown environment {name!r}; available: {available_envs()}")
    factory = _REGISTRY[name]
    if factory is _webshop:
        return _webshop_class(**kwargs)
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory if isinstance(factory, type) else None


def has_demonstrations(name: str, **kwargs: Any) -> bool | None:
    """Whether the environment can demonstrate its tasks for an SFT warm start (the household
    world's scripted searcher, or an oracle plan: ``expert_actions``), from its class, without
    building it; None when the registered factory is not a class."""
    cls = env_class(name, **kwargs)
    return None if cls is None else hasattr(cls, "expert_actions")


#: the options the trainer passes to every environment itself (``env.max_turns``, the episode's seed)
TRAINER_OPTIONS = {"max_turns": "env.max_turns", "seed": "the trainer (one seed per episode, from trainer.seed)"}


def check_options(name: str, options: dict[str, Any]) -> None:
    """Refuse, before anything is built, the ``options`` (``env.kwargs``) that ``make(name, seed=...,
    max_turns=..., **options)`` would refuse when the trainer builds the environment: an option the
    class does not take, one the trainer sets itself, and what the class's
    :meth:`~megatron_sdar.envs.base.TextEnv.check_options` refuses (the engine's own checks). Raises
    :class:`~megatron_sdar.envs.base.EnvOptionError`; a registered factory that is not a class is
    not checked (what it builds is known only when it runs)."""
    from megatron_sdar.envs.base import EnvOptionError

    for option, owner in TRAINER_OPTIONS.items():
        if option in options:
            raise EnvOptionError(option, f"is set by {owner}, not by an environment option")
    cls = env_class(name, **options)
    if cls is None:
        return
    parameters = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        accepted = [p for p in parameters if p not in TRAINER_OPTIONS]
        for option in options:
            if option not in parameters:
                raise EnvOptionError(option, f"is not an option of {name} ({cls.__name__}); its options: "
                                             f"{', '.join(accepted) or 'none'}")
    cls.check_options(**options)


def make(name: str, **kwargs: Any) -> TextEnv:
    """Build environment ``name`` with ``kwargs`` (see each class for its options)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown environment {name!r}; available: {available_envs()}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values()):
            raise TypeError(f"make({name!r}): {exc}; accepted options: "
                            f"{[p for p in inspect.signature(factory).parameters if p != 'self']}") from None
    return factory(**kwargs)
