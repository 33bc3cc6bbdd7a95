"""The interface every adapter implements.

An adapter type is three things, all in one file under ``lrft/adapters/``:

* a pydantic ``Config`` (subclass of :class:`AdapterConfig`) with ``type: Literal["<name>"]`` and the
  type's own options; unknown keys are rejected by the recipe loader;
* a layer class (subclass of :class:`AdapterLayer`) that wraps one frozen linear (``nn.Linear``,
  bitsandbytes ``Linear4bit`` or ``Linear8bitLt``) and adds ``delta(x) = x @ ΔWᵀ`` to its output;
* optionally a :class:`Controller` subclass for model-wide work between optimizer steps (gradient
  masking, rank pruning, regularisers summed over layers).

The registry in ``lrft/adapters/__init__.py`` maps ``type`` to these. ``delta_weight()`` is the single
definition of ΔW: merge, inspect-rank and the tests all go through it, and the tests pin that the forward
applies exactly that matrix.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
from typing import Any, Callable, ClassVar, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

# The five projections the LLM-Adapters / RandLoRA commonsense runs adapt.
PUBLISHED_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


class AdapterConfig(BaseModel):
    """Options every adapter has. Subclasses add ``type: Literal[...]`` and their own fields."""

    model_config = ConfigDict(extra="forbid")

    type: str
    r: int = Field(16, gt=0, description="rank (LoRA family) or basis rank (random-basis family)")
    alpha: Optional[float] = Field(None, gt=0, description="scaling numerator; scaling = alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[list[str], str] = Field(
        default_factory=lambda: list(PUBLISHED_TARGETS),
        description="module-name suffixes (list) or a regex matched against full module names (str)",
    )
    seed: int = Field(0, description="seed of the frozen random tensors (random-basis adapters)")

    def default_alpha(self) -> float:
        """The scaling numerator used when the recipe leaves ``alpha`` unset."""
        return 2.0 * self.r

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.default_alpha()) / self.r


# True while an adapter folder rebuilds layers that were already trained (merge, eval, inspect-rank,
# generate): advice about a configuration (RandLoRA's sparse-rank warning) is for whoever builds it to
# train, and would only repeat on every reload.
_REBUILDING = contextvars.ContextVar("lrft_rebuilding_trained_layers", default=False)


@contextlib.contextmanager
def rebuilding_trained_layers():
    token = _REBUILDING.set(True)
    try:
        yield
    finally:
        _REBUILDING.reset(token)


def building_for_training() -> bool:
    return not _REBUILDING.get()


class SharedTensors:
    """Frozen random tensors shared by every layer that asks for the same name.

    Random-basis adapters (RandLoRA, VeRA, NoLA) use the same bases in every layer of a given shape. They
    are generated here once, on the CPU from a seed derived from ``(adapter seed, name)`` so that every
    process and device gets bit-identical values without a broadcast, then moved to the target device and
    dtype. They are never registered as per-layer buffers (that would copy them per layer on ``.to()`` and
    save them per layer), and never saved: the adapter file records the seed and the sampler instead.
    """

    def __init__(
        self,
        seed: int,
        target_shapes: Optional[dict[str, tuple[int, int]]] = None,
        provided: Optional[dict[str, Tensor]] = None,
    ):
        self.seed = seed
        # (in_features, out_features) of every adapted layer by module name, for adapters whose shared
        # tensors are sized by all the targets at once (VeRA's bases span the largest in and out)
        self.target_shapes: dict[str, tuple[int, int]] = {n: tuple(s) for n, s in (target_shapes or {}).items()}
        # tensors read from a file instead of drawn from the seed (a PEFT adapter's saved projections,
        # drawn by PEFT's own generator); a larger one is sliced top-left to the requested shape, as PEFT does
        self.provided: dict[str, Tensor] = dict(provided or {})
        self._cache: dict[tuple, Tensor] = {}

    def seed_for(self, name: str) -> int:
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def get(
        self,
        name: str,
        shape: tuple[int, ...],
        sampler: Callable[[tuple[int, ...], torch.Generator], Tensor],
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> Tensor:
        device = torch.device(device)
        key = (name, tuple(shape), str(device), dtype)
        if key not in self._cache:
            if device.type == "meta":
                tensor = torch.empty(shape, device="meta", dtype=dtype)
            elif name in self.provided:
                source = self.provided[name]
                if source.dim() != len(shape) or any(have < want for have, want in zip(source.shape, shape)):
                    raise ValueError(f"provided frozen tensor {name} has shape {tuple(source.shape)}, smaller than {tuple(shape)}")
                tensor = source[tuple(slice(0, n) for n in shape)].to(device=device, dtype=dtype)
            else:
                generator = torch.Generator("cpu").manual_seed(self.seed_for(name))
                tensor = sampler(tuple(shape), generator).to(device=device, dtype=dtype)
            self._cache[key] = tensor
        return self._cache[key]

    def tensors(self) -> dict[tuple, Tensor]:
        return dict(self._cache)


class MaskDropout(nn.Dropout):
    """Dropout whose backward keeps a one-byte mask per element, as torch's fused kernel does on GPUs. On the
    CPU ``nn.Dropout`` keeps its float noise instead (four bytes for every input element of every adapted
    layer) and draws it with ``bernoulli_``, slow enough to be a sixth of a LoRA training step there;
    :class:`CpuDropout` draws four 16-bit lanes from each 64-bit random number instead."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if x.device.type in ("cpu", "meta"):  # meta: the dry run measures what a real device keeps, one byte
            return CpuDropout.apply(x, self.p)
        return nn.functional.dropout(x, self.p, True)


class CpuDropout(torch.autograd.Function):
    """Inverted dropout whose drop probability is ``p`` rounded to a multiple of 2^-16 (0.05 becomes
    0.0500031), and whose scaling is that of the rounded probability, so the output's expectation is
    the input's exactly."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        lanes = bits.view(torch.int16)[:n].view(x.shape)  # each uniform on [-2^15, 2^15)
        dropped = round(p * 65536)
        keep = lanes >= dropped - 32768
        ctx.scale = 65536 / (65536 - dropped)
        ctx.save_for_backward(keep)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def base_weight_info(base: nn.Module) -> tuple[int, int, torch.device]:
    """(in_features, out_features, device) of a plain or bitsandbytes linear."""
    weight = base.weight
    return base.in_features, base.out_features, weight.device


class AdapterLayer(nn.Module):
    """Wraps one frozen linear; ``forward(x) = base(x) + delta(dropout(x))``.

    Subclasses create their parameters in ``__init__`` (after calling ``super().__init__``) and implement
    ``delta``, ``delta_weight`` and ``num_trainable``. Trainable parameters are float32 (the optimizer
    needs the precision); frozen random tensors are stored in ``frozen_dtype`` (the compute dtype, never
    upcast). Construction must also work when the base weight lives on the ``meta`` device (dry runs).
    """

    # ΔW depends on the frozen weight (DoRA's W' − W): inspect-rank and merge rebuild such a layer around the
    # real (quantized) weight instead of a shape-only stand-in, and FSDP cannot train it
    needs_base_weight: ClassVar[bool] = False
    # config.r is a per-layer rank, so it must not exceed min(in, out) (VeRA's r is its shared bases' rank)
    r_must_fit: ClassVar[bool] = True

    def __init__(
        self,
        base_layer: nn.Module,
        config: AdapterConfig,
        shared: SharedTensors,
        name: str,
        frozen_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.name = name
        self.in_features, self.out_features, self.device = base_weight_info(base_layer)
        self.frozen_dtype = frozen_dtype
        self.scaling = config.scaling
        self.dropout = MaskDropout(config.dropout) if config.dropout > 0 else nn.Identity()
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    # --- what a subclass implements -------------------------------------------------------------
    def delta(self, x: Tensor) -> Tensor:
        """``x @ ΔWᵀ`` for x of shape (..., in_features), including the scaling."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """ΔW, shape (out_features, in_features), float32, including the scaling."""
        raise NotImplementedError

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, config: AdapterConfig) -> int:
        """The paper's trainable-parameter formula for one layer (tests pin it to the real count)."""
        raise NotImplementedError

    def extra_loss(self) -> Optional[Tensor]:
        """A regulariser for this layer, already weighted, or None."""
        return None

    def factors(self) -> Optional[tuple[Tensor, Tensor]]:
        """(B, A) with ΔW = B @ A exactly (scaling folded in), float32, whenever ΔW is such a product.

        The inner dimension may exceed min(out, in) (RandLoRA's n·r ≥ d): callers compare it with the layer's
        widths before they choose the factored path. inspect-rank gets a spectrum, and ``merge --format lora``
        a truncated SVD, from QR of the factors instead of an SVD of the formed ΔW. None only where ΔW is no
        fixed product of the adapter's tensors (DoRA rescales the base weight itself).
        """
        return None

    def rank_ceiling(self) -> Optional[int]:
        """A bound on rank(ΔW) below min(out, in) that the frozen parts impose whatever is trained (sparse
        random bases with empty input directions), for inspect-rank's ``rank_bound``; None when there is none."""
        return None

    def orthogonality_factors(self) -> Optional[tuple[Tensor, Tensor]]:
        """(B, A), unscaled, for adapters whose paper regularises ‖BᵀB − I‖²_F and ‖AAᵀ − I‖²_F
        (RM-LoRA eq. 10, AdaLoRA's P and Q); inspect-rank reports both. None when there are none."""
        return None

    # --- shared behaviour -----------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        return result + self.delta(self.dropout(x)).to(result.dtype)

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of the adapter's own parameters (float32 in training; tests may run float64)."""
        return next(iter(self._parameters.values())).dtype if self._parameters else torch.float32

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """What the adapter's matmuls run in: autocast's dtype when it is on, else the parameters' dtype."""
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.param_dtype

    def param_dtype_input(self, x: Tensor) -> Tensor:
        """Cast activations to the adapter's parameter dtype unless autocast decides the matmul dtype."""
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(self.param_dtype)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """What is saved for this layer: trainable parameters and persistent buffers, not the base.

        The keys are those of ``state_dict()``, but the base is never visited: under FSDP the base linear
        is a unit of its own whose ``state_dict`` hooks would all-gather its (frozen, large) weights.
        """
        state = {}
        for prefix, module in self.named_modules():
            if prefix == "base_layer" or prefix.startswith("base_layer."):
                continue
            dot = prefix + "." if prefix else ""
            for key, param in module.named_parameters(recurse=False):
                state[dot + key] = param.detach()
            for key, buffer in module.named_buffers(recurse=False):
                if key not in module._non_persistent_buffers_set:
                    state[dot + key] = buffer.detach()
        return state

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"layer {self.name}: missing {missing}, unexpected {unexpected}")
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise ValueError(
                    f"layer {self.name}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
                )
        self.load_state_dict(state, strict=False)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.config.r}, scaling={self.scaling:g}"


class Controller:
    """Model-wide behaviour between optimizer steps. The training loop calls, in order, every step:

    ``start_step(step)`` before the step's micro-batches; ``extra_loss()`` added to each micro-batch's
    loss; ``before_optimizer_step(step, optimizer)`` after all backward passes (gradients available);
    ``after_optimizer_step(step, optimizer)`` after ``optimizer.step()``. ``step`` counts optimizer steps
    from 0. The default sums the layers' ``extra_loss`` and does nothing else.
    """

    def __init__(self, layers: dict[str, AdapterLayer], config: AdapterConfig, total_steps: int):
        self.layers = layers
        self.config = config
        self.total_steps = total_steps

    def start_step(self, step: int) -> None:
        pass

    def extra_loss(self) -> Optional[Tensor]:
        terms = [t for t in (layer.extra_loss() for layer in self.layers.values()) if t is not None]
        if not terms:
            return None
        return torch.stack([t.float() for t in terms]).sum()

    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Extra state for exact resume (e.g. importance EMAs), JSON- or tensor-valued."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        """Facts worth saving in adapter_config.json at the end (e.g. final per-layer ranks)."""
        return {}


def kaiming_uniform_(tensor: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``nn.init.kaiming_uniform_(a=sqrt(5))`` (the nn.Linear / LoRA-A default), honouring a generator."""
    fan_in = tensor.shape[1]
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        if tensor.device.type == "meta":
            return tensor
        return tensor.uniform_(-bound, bound, generator=generator)


# --- orthogonality: the regularisers of RM-LoRA, AdaLoRA and LoRA², and what inspect-rank reports of them


def gram_residual(gram: Tensor, squared: bool = True) -> Tensor:
    """``‖G − I‖²_F`` (``squared``) or ``‖G − I‖_F`` of a square Gram matrix G."""
    residual = gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
    # vector_norm's gradient at an exactly orthogonal factor is 0, where sqrt(sum of squares) gives NaN
    return (residual * residual).sum() if squared else torch.linalg.vector_norm(residual)


def orthogonality_residuals(B: Tensor, A: Tensor, squared: bool = True) -> tuple[Tensor, Tensor]:
    """(‖AAᵀ − I‖, ‖BᵀB − I‖), squared or not, for ΔW ∝ B A (A: r × in, B: out × r), in ``A``'s dtype: the
    regularisers of RM-LoRA (eq. 10), AdaLoRA (P = B, Q = A) and LoRA² (between planes), and what inspect-rank
    reports of them."""
    return gram_residual(A @ A.T, squared), gram_residual(B.T @ B, squared)


__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "Controller",
    "SharedTensors",
    "PUBLISHED_TARGETS",
    "kaiming_uniform_",
]
