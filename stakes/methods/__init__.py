"""Unlearning methods: one module per method, each a registered :class:`UnlearningMethod`, and the
loop that runs any of them (:mod:`stakes.methods.loop`: ``unlearn``).

    result = stakes.unlearn(model, (forget_x, forget_y), method="structguard", anchors=A)

Built-ins, in registration order: structguard, neggrad, adv, l2ul, salun, finetune, and the retrain
oracle (``stakes compare --retrain``). ``stakes.register_method(name, method)`` adds a user's.
"""

from stakes.methods.base import (Batch, UnlearningMethod, available_methods, get_method, register_method,
                                 unregister_method)
from stakes.methods.loop import (DeployedModel, NonFiniteError, Projector, UnlearnResult, _Run, build_proxies,
                                 random_projection, unlearn)

# the built-in methods register themselves on import, in this order
from stakes.methods import structguard, neggrad, adv, l2ul, salun, finetune, retrain  # noqa: E402,F401  isort: skip

# the built-in names (a user's registered methods: available_methods())
METHODS = tuple(available_methods())

__all__ = ["Batch", "DeployedModel", "METHODS", "NonFiniteError", "Projector", "UnlearnResult", "UnlearningMethod",
           "available_methods", "build_proxies", "get_method", "random_projection", "register_method",
           "unlearn", "unregister_method"]
