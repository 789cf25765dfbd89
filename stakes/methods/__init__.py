"""Unlearning methods: one module per method, each a registered :class:`UnlearningMethod`, and the
loop that runs any of them (:mod:`stakes.methods.loop`: ``unlearn``), with the context its hooks
receive (:class:`UnlearnContext`).

    result = stakes.unlearn(model, (forget_x, forget_y), method="structguard", anchors=A)

Built-ins, in registration order: structguard, neggrad, adv, l2ul, salun, finetune.
``stakes.register_method(name, method)`` adds a user's. The retrain oracle is a comparison job
(:func:`stakes.oracle.retrain_oracle`, ``stakes compare --retrain``), not a method.
"""

from stakes.methods.base import (Batch, UnlearningMethod, Variant, available_methods, get_method, preset,
                                 register_method, route_options, unregister_method)
from stakes.methods.context import UnlearnContext
from stakes.methods.loop import (DeployedModel, NonFiniteError, Projector, UnlearnResult, build_proxies,
                                 random_projection, unlearn)

# the built-in methods register themselves on import, in this order
from stakes.methods import structguard, neggrad, adv, l2ul, salun, finetune  # noqa: E402,F401  isort: skip

# the built-in names (a user's registered methods: available_methods())
METHODS = tuple(available_methods())

__all__ = ["Batch", "DeployedModel", "METHODS", "NonFiniteError", "Projector", "UnlearnContext", "UnlearnResult",
           "UnlearningMethod", "Variant", "available_methods", "build_proxies", "get_method", "preset",
           "random_projection", "register_method", "route_options", "unlearn", "unregister_method"]
