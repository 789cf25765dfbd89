"""``StructureSGD``: SGD with the structure-aware regulariser fused into the step (METHOD.md §6, §9).

Each ``step()`` applies, per parameter group, one :func:`fused.update.masked_regularized_sgd_step`
(one kernel launch per dtype group of the param group's tensors):

    ψ ← ψ − lr·(m⊙g + weight_decay·ψ + lam·I⊙(ψ − ψ0))       (explicit; optional momentum)

or its proximal form (``proximal=True``), so the model's loss needs no ½·λ·ΣI(ψ−ψ0)² term: the
optimizer adds its gradient. The paper's setting is plain SGD, lam = 1, no momentum, no weight
decay, with the projector in its own param group with its own lr.

Per-parameter state (saved by ``state_dict()``):

* ``"ref_param"``: ψ0, the weights before unlearning; by default a detached clone of the
  parameter taken when it joins the optimizer.
* ``"importance"``: I (floating, or a bool/uint8 mask), absent = no SR term for that parameter.
  The optimizer starts with no importance (plain SGD) until :meth:`StructureSGD.set_importance`.
* ``"grad_mask"``: m, absent = all ones.
* ``"momentum_buffer"``: created as zeros at the first step with ``momentum > 0``.

``load_state_dict`` keeps the saved dtypes of these tensors (``torch.optim.Optimizer`` would cast
every floating state tensor to its parameter's dtype) and copies them, so the loaded optimizer shares
no storage with the saved dict.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from fused._dispatch import check_tensor
from fused.update import check_update_hyperparameters, masked_regularized_sgd_step

__all__ = ["StructureSGD"]

PerParam = Union[Sequence[Optional[torch.Tensor]], Mapping[torch.Tensor, Optional[torch.Tensor]]]
_STATE_TENSORS = ("ref_param", "importance", "grad_mask", "momentum_buffer")


class StructureSGD(torch.optim.Optimizer):
    """SGD whose step adds the structure-aware regulariser's gradient λ·I⊙(ψ − ψ0) (fused).

    Args:
        params: parameters or param groups (dicts); a group may set its own ``lr``, ``lam``,
            ``momentum``, ``weight_decay`` and ``proximal``.
        ref_params: ψ0 per parameter, as a list in parameter order (over all groups) or a dict
            parameter → tensor; ``None`` (or a missing entry) = a detached clone of the parameter
            now. Given tensors are stored by reference, not copied.
        importance: I per parameter (list or dict, as ``ref_params``); ``None`` = no SR term.
        lr, lam, momentum, weight_decay, proximal: defaults for the groups (see
            :func:`fused.update.masked_regularized_sgd_step`).
        grad_masks: gradient masks per parameter (list or dict); ``None`` = no mask.
        backend: passed to the update op (``None``, "triton" or "reference").

    After each ``step()``, ``last_sr_loss`` is the 0-dim fp32 tensor ½·ΣI(ψ−ψ0)² over all
    parameters, measured before the step (``None`` before the first step). It is not synchronised.
    """

    def __init__(
        self,
        params,
        ref_params: Optional[PerParam] = None,
        importance: Optional[PerParam] = None,
        *,
        lr: float,
        lam: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        proximal: bool = False,
        grad_masks: Optional[PerParam] = None,
        backend: Optional[str] = None,
    ):
        check_update_hyperparameters(lr, lam, momentum, weight_decay, proximal)
        defaults = dict(lr=lr, lam=lam, momentum=momentum, weight_decay=weight_decay, proximal=proximal)
        self.backend = backend
        self.last_sr_loss: Optional[torch.Tensor] = None
        self._constructed = False
        super().__init__(params, defaults)
        self._constructed = True
        if ref_params is not None:
            self._set_per_param("ref_param", "ref_params", ref_params, allow_bool=False)
        for group in self.param_groups:
            self._default_refs(group["params"])
        if importance is not None:
            self.set_importance(importance)
        if grad_masks is not None:
            self.set_grad_masks(grad_masks)

    # ------------------------------------------------------------------ configuration

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group (validating its hyperparameters); its ψ0 default to clones of its params."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for name in ("lr", "lam", "momentum", "weight_decay", "proximal"):
            if name not in group:
                raise ValueError(f"param group is missing {name!r}")
        try:
            check_update_hyperparameters(
                group["lr"], group["lam"], group["momentum"], group["weight_decay"], group["proximal"]
            )
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        for p in group["params"]:
            if not p.is_floating_point():
                self.param_groups.pop()
                raise TypeError(f"params must be floating-point tensors, got {p.dtype}")
        if self._constructed:  # a group added later (in __init__, explicit ref_params come first)
            self._default_refs(group["params"])

    def _all_params(self) -> List[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _default_refs(self, params: Iterable[torch.Tensor]) -> None:
        for p in params:
            if "ref_param" not in self.state[p]:
                self.state[p]["ref_param"] = p.detach().clone()

    def _set_per_param(self, key: str, name: str, values: PerParam, *, allow_bool: bool) -> None:
        """Store ``values`` (list in parameter order, or dict param → tensor) as ``state[p][key]``."""
        params = self._all_params()
        if isinstance(values, Mapping):
            known = {id(p) for p in params}
            for p in values:
                if id(p) not in known:
                    raise ValueError(f"{name} has a key that is not a parameter of this optimizer")
            by_id = {id(p): v for p, v in values.items()}
            values = [by_id.get(id(p)) for p in params]
        elif isinstance(values, torch.Tensor) or not isinstance(values, (list, tuple)):
            raise TypeError(f"{name} must be a list (one entry per parameter) or a dict parameter -> tensor")
        elif len(values) != len(params):
            raise ValueError(f"{name} must have {len(params)} entries (one per parameter), got {len(values)}")
        for i, (p, v) in enumerate(zip(params, values)):
            if v is not None:
                check_tensor(f"{name}[{i}]", v, allow_bool=allow_bool)
                if v.shape != p.shape:
                    raise ValueError(f"{name}[{i}] has shape {tuple(v.shape)} but its parameter has {tuple(p.shape)}")
                if v.device != p.device:
                    raise ValueError(f"{name}[{i}] is on {v.device} but its parameter is on {p.device}")
        for p, v in zip(params, values):
            if v is None:
                self.state[p].pop(key, None)
            else:
                self.state[p][key] = v.detach()

    def set_importance(self, importance: Optional[PerParam]) -> None:
        """Set I per parameter (list in parameter order or dict; ``None`` entries / ``None`` = none).

        Floating importance or a bool/uint8 mask (1 where nonzero); stored by reference.
        """
        if importance is None:
            for p in self._all_params():
                self.state[p].pop("importance", None)
            return
        self._set_per_param("importance", "importance", importance, allow_bool=True)

    def set_grad_masks(self, grad_masks: Optional[PerParam]) -> None:
        """Set the gradient mask per parameter (floating, bool or uint8; ``None`` = no mask)."""
        if grad_masks is None:
            for p in self._all_params():
                self.state[p].pop("grad_mask", None)
            return
        self._set_per_param("grad_mask", "grad_masks", grad_masks, allow_bool=True)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, keeping saved dtypes and owning copies."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, p in zip(saved_group["params"], group["params"]):
                for key, value in saved.get(index, {}).items():
                    if key in _STATE_TENSORS and isinstance(value, torch.Tensor):
                        self.state[p][key] = value.to(device=p.device, copy=True)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        """One fused update per param group; returns the closure's loss (if given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        total = None
        for group in self.param_groups:
            params = group["params"]
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            importance = [s.get("importance") for s in states]
            if all(g is None for g in grads) and all(i is None for i in importance):
                continue
            momentum_buffers = None
            if group["momentum"] > 0:
                for p, s in zip(params, states):
                    if "momentum_buffer" not in s:  # zeros: the first step gives b = d, as torch SGD
                        s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                momentum_buffers = [s["momentum_buffer"] for s in states]
            sr = masked_regularized_sgd_step(
                params,
                grads,
                [s["ref_param"] for s in states],
                importance,
                lr=group["lr"],
                lam=group["lam"],
                momentum=group["momentum"],
                momentum_buffers=momentum_buffers,
                grad_masks=[s.get("grad_mask") for s in states],
                weight_decay=group["weight_decay"],
                proximal=group["proximal"],
                backend=self.backend,
            )
            total = sr if total is None else total + sr
        if total is None:  # no gradient and no importance anywhere: the SR value is 0
            total = torch.zeros((), dtype=torch.float32, device=self.param_groups[0]["params"][0].device)
        self.last_sr_loss = total
        return loss
