"""Routing the calls of the registered layers through a handler while ``logits_fn`` is traced, for linen and NNX.

Linen has a hook for this (``nn.intercept_methods``). NNX has none that works from outside a model: ``nnx.capture``
needs the module instance, while the estimators see only ``logits_fn(params, inputs)``. So inside
:func:`layer_calls` the registered NNX classes' ``__call__`` is replaced by a wrapper, installed once however many
threads are inside (a count under a lock) and removed when the last one leaves. The wrapper sends a call to a
handler only on a thread that is inside :func:`layer_calls` (a thread-local stack); on every other thread it calls
the original ``__call__`` unchanged, so a concurrent trace or computation elsewhere is not affected. Flax's own
``nnx.capture(..., method_outputs=...)`` patches classes the same way (without the per-thread routing).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn

from jaxforget.curvature.layers import nnx_layer_types, rule_for

# handler(module, call, args, kwargs) -> output, where call(*args, **kwargs) runs the layer itself.
Handler = Callable[[Any, Callable[..., Any], tuple, dict], Any]

_lock = threading.Lock()
_local = threading.local()
_installed: dict[type, Callable[..., Any] | None] = {}  # class -> its own __call__ (None: inherited)
_users = 0


def _handlers() -> list[Handler]:
    if not hasattr(_local, "handlers"):
        _local.handlers = []
    return _local.handlers


def _routed(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        handlers = getattr(_local, "handlers", None)
        if not handlers or rule_for(self) is None:
            return original(self, *args, **kwargs)
        return handlers[-1](self, functools.partial(original, self), args, kwargs)

    return __call__


def _install() -> None:
    global _users
    with _lock:
        if _users == 0:
            for cls in nnx_layer_types():
                _installed[cls] = cls.__dict__.get("__call__")
                cls.__call__ = _routed(cls.__call__)
        _users += 1


def _uninstall() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            for cls, own in _installed.items():
                if own is None:
                    del cls.__call__
                else:
                    cls.__call__ = own
            _installed.clear()


@contextlib.contextmanager
def layer_calls(handler: Handler) -> Iterator[None]:
    """Within the block, on this thread, every call of a registered linen or NNX layer goes through ``handler``."""

    def linen(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or rule_for(context.module) is None:
            return next_fun(*args, **kwargs)
        return handler(context.module, next_fun, args, kwargs)

    _install()
    handlers = _handlers()
    handlers.append(handler)
    try:
        with nn.intercept_methods(linen):
            yield
    finally:
        handlers.pop()
        _uninstall()
