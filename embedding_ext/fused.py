"""``fuse_optimizer``: the optimizer step inside the lookup's backward.

    emb = ee.Embedding(V, D, padding_idx=0)
    opt = ee.fuse_optimizer(emb, torch.optim.SparseAdam, lr=1e-3)
    loss.backward()          # the touched rows of emb.weight are updated here
    opt.step(); opt.zero_grad()   # harmless: training loops need no change

The backward runs ``embedding_fused_update_``: positions grouped by row, each row's gradient
summed once, the rule applied once per row; no gradient tensor is built and
``emb.weight.grad`` stays ``None``. The returned object is a ``torch.optim.Optimizer`` with the
``param_groups`` and ``state_dict()`` format of the optimizer it stands for, so a run can
move between fused and unfused training.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor

from . import distributed, ops
from .fused_skips import SkippedUpdates
from .lookup import normalize_padding_idx, renorm_rows
from .optim import RowWiseAdagrad
from .step_boundary import fused_step_backward

_SGD, _ADAGRAD, _SPARSE_ADAM, _ROWWISE_ADAGRAD = 0, 1, 2, 3
_RULES = {torch.optim.SGD: _SGD, torch.optim.Adagrad: _ADAGRAD,
          torch.optim.SparseAdam: _SPARSE_ADAM, RowWiseAdagrad: _ROWWISE_ADAGRAD}


def _state_dtype(weight: Tensor) -> torch.dtype:
    """The optimizer state's dtype: the weight's for fp32/fp64, fp32 for fp16/bf16."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def fuse_optimizer(module: torch.nn.Module, optimizer_class: type,
                   **kwargs: object) -> "FusedOptimizer":
    """Fuses ``optimizer_class(module.parameters(), **kwargs)`` into the backward of
    ``module`` (``ee.Embedding``; ``ee.EmbeddingBag`` or ``ee.EmbeddingBagCollection``
    pooling sum or mean); returns the optimizer (:class:`FusedOptimizer`)."""
    make = getattr(module, "_make_fused_optimizer", None)  # a collection: every table
    if make is not None:
        return make(optimizer_class, **kwargs)
    return FusedOptimizer(module, optimizer_class, **kwargs)


def fused_optimizer_of(module: torch.nn.Module) -> "FusedOptimizer | None":
    """The live fused optimizer of ``module``'s weight, or None. The module holds a weak
    reference (``_ee_fused_ref``, None on the class: torch.compile sees a constant for every
    unfused module); a copy (deepcopy, pickle: ee.Embedding drops the reference) or a
    weight replaced while the optimizer lives raises, and dropping the optimizer unfuses."""
    ref = module._ee_fused_ref
    optimizer = None if ref is None else ref()
    if optimizer is None:
        return None
    if optimizer.param_groups[0]["params"][0] is not module.weight:
        # parallelize_module, fully_shard or an assignment replaced the weight after
        # fusing: the new weight would get ordinary gradients that the fused optimizer's
        # step() ignores, and training would silently stop.
        raise RuntimeError(
            "fuse_optimizer: the module's weight was replaced after fusing (parallelize_module, "
            "fully_shard, or an assignment); call ee.fuse_optimizer again after replacing it, "
            "and drop the old optimizer")
    return optimizer


class Fusable:
    """The base of the modules an optimizer can be fused into (ee.Embedding,
    ee.EmbeddingBag) and what ee.fuse_optimizer needs of them: the weak reference to the
    optimizer fused into its backward (None on the class: torch.compile sees a constant for
    every unfused module), dropped from copies and pickles (which are not fused)."""

    _ee_fused_ref = None

    def _fused_optimizer(self):
        if (self._ee_fused_ref is not None and torch.is_grad_enabled()
                and self.weight.requires_grad):
            return fused_optimizer_of(self)
        return None

    def __getstate__(self) -> dict:
        # Copies and pickles are not fused (and a weak reference cannot be pickled).
        state = self.__dict__.copy()
        state.pop("_ee_fused_ref", None)
        return state


class FusedOptimizer(torch.optim.Optimizer):
    """The optimizer of one ``ee.Embedding``'s weight, applied inside its backward.

    Accepted: ``torch.optim.SGD`` (no momentum, weight decay, nesterov or maximize),
    ``torch.optim.Adagrad`` (its sparse-gradient rule: no weight decay or maximize),
    ``torch.optim.SparseAdam`` (no maximize) and ``ee.optim.RowWiseAdagrad``. Duplicates are
    summed before the update, ``padding_idx`` rows are never touched, ``scale_grad_by_freq``
    and ``max_norm`` behave as without fusion. Each backward is one optimizer step; changes to
    ``param_groups`` (``lr``) take effect at the next backward. State: the weight's dtype for
    fp32/fp64 weights, fp32 for fp16/bf16 (also after ``load_state_dict``).

    The fusion belongs to the module's weight Parameter and lasts while this object lives: a
    copy of the module (deepcopy, pickle) is not fused; a weight replaced while the
    optimizer lives (parallelize_module, fully_shard) raises at the next lookup.

    Refused with an error: a second backward through the lookup before ``step()`` (two
    lookups in one step, or gradient accumulation), ``create_graph=True``, more parameter
    groups, and a gradient for the weight from anywhere else (tied weights; raised after this
    step's update, with the other gradient dropped).
    """

    def __init__(self, module: torch.nn.Module, optimizer_class: type, **kwargs: object):
        if not isinstance(module, Fusable):
            raise TypeError(f"fuse_optimizer: 'module' must be an ee.Embedding or "
                            f"ee.EmbeddingBag, got {type(module).__name__}")
        if isinstance(module, torch.nn.EmbeddingBag) and module.mode == "max":
            raise NotImplementedError(_MAX_MODE_REFUSAL)
        if optimizer_class not in _RULES:
            names = ", ".join(f"{c.__module__}.{c.__name__}" for c in _RULES)
            raise TypeError(f"fuse_optimizer: 'optimizer_class' must be one of {names}, got "
                            f"{getattr(optimizer_class, '__name__', optimizer_class)}")
        weight = module.weight
        if fused_optimizer_of(module) is not None:
            raise RuntimeError("fuse_optimizer: this module already has a fused optimizer")
        # The torch optimizer validates the arguments and gives the defaults (and so the
        # param_groups and state_dict format) of the optimizer this one stands for; built on
        # a 1 x 1 stand-in, so that no table-sized state is made for it.
        stand_in = torch.nn.Parameter(torch.zeros(1, 1, dtype=weight.dtype))
        defaults = optimizer_class([stand_in], **kwargs).defaults
        self._refuse_unsupported(optimizer_class, defaults)
        self._rule = _RULES[optimizer_class]
        self._optimizer_class = optimizer_class
        self._updated = False  # since the last step()
        super().__init__([weight], defaults)
        self._skips = SkippedUpdates(self)  # CUDA: step counts of skipped updates taken back
        if self._rule == _ADAGRAD:  # torch's Adagrad makes its state at construction
            self.state[weight] = {
                "step": torch.tensor(0.0),
                "sum": torch.full_like(weight, defaults["initial_accumulator_value"],
                                       dtype=_state_dtype(weight)),
            }
        this = weakref.ref(self)

        def refuse_outside_gradient(param: Tensor) -> None:
            # Autograd also runs this after the fused lookup's own (None) gradient.
            if param.grad is None or this() is None:
                return
            param.grad = None
            raise RuntimeError(
                "fuse_optimizer: the fused weight received a gradient from outside its lookup "
                "(tied weights?); a fused optimizer must be the only consumer of the weight's "
                "gradient (this step's fused update was applied, the other gradient dropped)")
        self._hook = weight.register_post_accumulate_grad_hook(refuse_outside_gradient)
        module._ee_fused_ref = this

    @staticmethod
    def _refuse_unsupported(optimizer_class: type, defaults: dict) -> None:
        refused = []
        if optimizer_class is torch.optim.SGD:
            refused = [k for k in ("momentum", "weight_decay", "nesterov") if defaults.get(k)]
        elif optimizer_class is torch.optim.Adagrad:
            refused = [k for k in ("weight_decay",) if defaults.get(k)]
        refused += [k for k in ("maximize", "differentiable") if defaults.get(k)]
        if refused:
            raise ValueError(f"fuse_optimizer: {optimizer_class.__name__} with "
                             f"{', '.join(f'{k}={defaults[k]}' for k in refused)} cannot be "
                             "fused (use the optimizer unfused)")

    def __del__(self):
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.remove()

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "param_groups", None):
            raise RuntimeError("fuse_optimizer: a fused optimizer has one parameter (its "
                               "module's weight); use another optimizer for other parameters")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict`` (the format of the optimizer this one
        stands for), then the state back to its dtype (torch casts it to the weight's)."""
        # The loaded tensors as given (torch's load rounds fp32 state to an fp16/bf16 weight's
        # dtype, which would lose precision on the way back to fp32).
        given = dict(state_dict.get("state", {}).get(0, {}))
        super().load_state_dict(state_dict)
        self._updated = False
        self._skips.forget()
        weight = self.param_groups[0]["params"][0]
        for name, value in given.items():
            if name != "step" and torch.is_tensor(value):
                value = value.to(weight.device, _state_dtype(weight), copy=True)
                if distributed.is_dtensor(weight) and not distributed.is_dtensor(value):
                    # A full (unsharded) state for a sharded weight: this rank's rows of it.
                    value = distributed.shard_like(value, weight)
                self.state[weight][name] = value

    def _update(self, grad_output: Tensor, indices: Tensor, padding_idx: int,
                scale_grad_by_freq: bool) -> None:
        """The backward: one optimizer step on the rows ``indices`` touched. The step count
        and the flags change only once the update has run."""
        group, local, step = self._prepare()
        betas = group.get("betas", (0.0, 0.0))
        with torch.no_grad():
            ops.embedding_fused_update_(
                local[0], grad_output.to(local[0].dtype), indices, padding_idx,
                bool(scale_grad_by_freq), self._rule, local[1], local[2], float(group["lr"]),
                float(group.get("eps", 0.0)), float(betas[0]), float(betas[1]),
                float(group.get("lr_decay", 0.0)), step)
        self._finish(indices, local[0])

    def _prepare(self) -> tuple[dict, list, int]:
        """Before an update: the refusals, the lazy state, and (group, [weight, state1,
        state2] as local tensors, the step number the update takes)."""
        if torch.is_grad_enabled():
            raise RuntimeError("fuse_optimizer: backward(create_graph=True) is not supported "
                               "with a fused optimizer (the update has no graph)")
        if self._updated:
            raise RuntimeError("fuse_optimizer: a second backward through the fused lookup "
                               "before step(): two lookups in one step, or gradient "
                               "accumulation, are not supported with a fused optimizer "
                               "(concatenate the ids into one lookup)")
        group = self.param_groups[0]
        weight = group["params"][0]
        # (SGD keeps no state, as torch's without momentum: no entry made.)
        state = self.state[weight] if self._rule != _SGD else {}
        if self._rule in (_SPARSE_ADAM, _ROWWISE_ADAGRAD) and not state:  # lazy, as torch's
            # zeros_like / full_like: a DTensor weight's state is a DTensor placed alike.
            if self._rule == _SPARSE_ADAM:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(weight, dtype=_state_dtype(weight))
                state["exp_avg_sq"] = torch.zeros_like(weight, dtype=_state_dtype(weight))
            else:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["sum"] = distributed.row_state_like(
                    weight, group["initial_accumulator_value"], _state_dtype(weight))
        for name, value in state.items():  # follow the weight (module.to() after fusing)
            if name != "step" and (value.device != weight.device
                                   or value.dtype != _state_dtype(weight)):
                state[name] = value.to(weight.device, _state_dtype(weight))
        names = {_ADAGRAD: ("sum", None), _SPARSE_ADAM: ("exp_avg", "exp_avg_sq"),
                 _ROWWISE_ADAGRAD: ("sum", None)}.get(self._rule, (None, None))
        state1, state2 = (state[n] if n else None for n in names)
        self._skips.settle()  # the last update's step, if it was skipped, taken back first
        step = int(state["step"]) + 1 if state else 1
        # A row-sharded (DTensor) weight: this rank's rows and state; grad_output and
        # indices are then already this rank's positions, in local row numbers.
        local = [t.to_local() if distributed.is_dtensor(t) else t for t in (weight, state1, state2)]
        return group, local, step

    def _finish(self, indices: Tensor, local_weight: Tensor) -> None:
        """After the update ran: the step count and the once-per-step flag."""
        state = self.state[self.param_groups[0]["params"][0]] if self._rule != _SGD else {}
        if state:
            state["step"] += 1
            self._skips.launched(indices, local_weight)
        self._updated = True

    def state_dict(self) -> dict:
        self._skips.settle()  # no step count of a skipped CUDA update
        return super().state_dict()

    # torch.amp.GradScaler.step() hands an optimizer with this flag its state (the
    # attributes grad_scale and found_inf) instead of unscaling gradients it does not have:
    # step() refuses it by name (without the flag the scaler fails with "No inf checks were
    # recorded", or, after scaler.unscale_(), steps silently).
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """The update already happened in the backward: only runs ``closure`` and re-arms."""
        # The scaler sets found_inf on every step() (grad_scale is None after unscale_()).
        if "found_inf" in self.__dict__:
            for name in ("grad_scale", "found_inf"):  # it deletes them only after a step
                self.__dict__.pop(name, None)
            raise RuntimeError(
                "fuse_optimizer: torch.amp.GradScaler cannot drive a fused optimizer: the "
                "update runs inside the backward, before the scaler can unscale the gradient "
                "or skip a step with inf/NaN (this step's update used the scaled gradient). "
                "Train without the scaler (bf16 autocast needs none) or unfuse")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._updated = False
        self._skips.settle(wait=False)
        return loss


class FusedLookupFunction(torch.autograd.Function):
    """``weight[indices]`` whose backward is the fused optimizer's update (no gradient)."""

    @staticmethod
    def forward(ctx, weight: Tensor, indices: Tensor, padding_idx: int,
                scale_grad_by_freq: bool, optimizer: FusedOptimizer) -> Tensor:
        ctx.save_for_backward(indices)
        ctx.padding_idx, ctx.scale = padding_idx, scale_grad_by_freq
        ctx.optimizer = optimizer
        return ops.embedding_forward(weight, indices)

    @staticmethod
    @fused_step_backward
    def backward(ctx, grad_output: Tensor):
        (indices,) = ctx.saved_tensors
        ctx.optimizer._update(grad_output, indices, ctx.padding_idx, ctx.scale)
        return None, None, None, None, None


def refuse_inside_ddp(weight: Tensor) -> None:
    """A fused weight that DistributedDataParallel synchronises is refused: DDP would wait
    for (or, with find_unused_parameters, skip) a gradient the weight never gets, and each
    rank would update its rows from its own batch alone, silently diverging. DDP marks the
    module whose forward is running (the attribute torch.compile's DDP support reads)."""
    ddp = getattr(torch.nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
    if ddp is not None and any(p is weight for p in getattr(ddp, "_module_parameters", ())):
        raise RuntimeError(
            "fuse_optimizer: the fused module runs inside DistributedDataParallel, which "
            "synchronises gradients the fused weight never gets (each rank would update its "
            "rows from its own batch alone); leave the weight out of DDP "
            "(DistributedDataParallel._set_params_and_buffers_to_ignore_for_model) for "
            "per-rank tables, or shard the table (RowwiseParallel) and fuse there")


# torch.compile: the fused lookups run eagerly, a graph break on each side (the rest of the
# model compiles). Their backward is the optimizer's step, Python bookkeeping with side
# effects (step counts, lazy state, the once-per-step check) that AOTAutograd would
# otherwise trace once at compile time instead of running every step.
_NOT_COMPILED = ("a fused optimizer's lookup runs eagerly (its backward is the optimizer "
                 "step); compile without fullgraph=True, or unfuse")


@torch.compiler.disable(reason=_NOT_COMPILED)
def fused_lookup(input: Tensor, weight: Tensor, optimizer: FusedOptimizer,
                 padding_idx: int | None, max_norm: float | None, norm_type: float,
                 scale_grad_by_freq: bool) -> Tensor:
    """ee.Embedding's forward with a fused optimizer: the lookup (after the max_norm renorm,
    as without fusion) whose backward is the optimizer's update."""
    refuse_inside_ddp(weight)
    padding = normalize_padding_idx(padding_idx, weight.shape[0])
    if distributed.is_dtensor(weight, input):
        return distributed.fused_lookup(input, weight, optimizer, padding, max_norm, norm_type,
                                        scale_grad_by_freq)
    if max_norm is not None:
        input = renorm_rows(weight, input, max_norm, norm_type)
    return FusedLookupFunction.apply(weight, input, padding, bool(scale_grad_by_freq), optimizer)


_MAX_MODE_REFUSAL = ("fuse_optimizer: an ee.EmbeddingBag in mode='max' cannot be fused (its "
                     "gradient is per column, not per row: no per-row update); use sum or mean")
