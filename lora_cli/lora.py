"""The LoRA layer: y = W x + b + scaling * B A dropout(x), with optional rsLoRA and DoRA.

`LoraLinear` wraps an existing `nn.Linear` or transformers `Conv1D` (GPT-2 stores W as (in, out)). It adopts the
base module's own `weight` and `bias` Parameters under the same names: no copy, and the model's state_dict keys of
the base weights stay exactly as they were (`...q_proj.weight`), which keeps checkpoints, `save_pretrained` and
distributed wrappers working. The LoRA tensors live beside them as `lora_A.weight`, `lora_B.weight` and (DoRA)
`lora_magnitude_vector`, which are also the names PEFT writes, prefixed with `base_model.model.`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

try:  # transformers' GPT-2 style linear layer: weight (in, out), "fan-in fan-out"
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always ships it
    Conv1D = ()

LORA_DTYPE = torch.float32  # trainable params stay fp32 even on an fp16 base: fp16 AMP cannot unscale fp16 grads
INIT_CHOICES = ("default", "gaussian")


def is_lora_target_type(module: nn.Module) -> bool:
    """The module kinds LoRA can wrap."""
    return isinstance(module, nn.Linear) or (Conv1D != () and isinstance(module, Conv1D))


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraLinear(nn.Module):
    """A Linear/Conv1D with a low-rank update. Build it with `LoraLinear.from_base(module, ...)`."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        use_dora: bool = False,
    ):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if init not in INIT_CHOICES:
            raise ValueError(f"LoRA init must be one of {INIT_CHOICES}, got {init!r}")
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # Conv1D keeps W as (in, out)
        out_features, in_features = self._oriented(base.weight).shape
        self.in_features, self.out_features = in_features, out_features
        # The base's own Parameters, adopted under their own names (no copy, no rename).
        self.weight = base.weight
        self.bias = base.bias
        self._base_type = type(base)
        # Keep the rest of the original module (its class, extra attributes) to hand back on merge, without
        # registering it as a child: registering would list the shared weight twice in the state_dict.
        self._base_holder = [base]

        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        device = base.weight.device
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=LORA_DTYPE)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=LORA_DTYPE)
        # Identity when dropout is 0, so the hot path does no dropout work at all.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters(init)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(self._weight_norm(self._lora_delta().detach()))
        self.merged = False
        self.lora_enabled = True

    @classmethod
    def from_base(cls, base: nn.Module, **kwargs) -> "LoraLinear":
        if not is_lora_target_type(base):
            raise TypeError(f"LoRA wraps nn.Linear or Conv1D modules, not {type(base).__name__}")
        return cls(base, **kwargs)

    # --- weights -------------------------------------------------------------------------------------------

    def reset_lora_parameters(self, init: str = "default") -> None:
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            else:  # nn.Linear's own init, as PEFT does: kaiming-uniform with a = sqrt(5)
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def _oriented(self, weight: torch.Tensor) -> torch.Tensor:
        """W in (out, in) orientation whatever the base layer stores."""
        return weight.t() if getattr(self, "fan_in_fan_out", False) else weight

    def _lora_delta(self) -> torch.Tensor:
        """scaling * B A in fp32, shape (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _weight_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """Row norms of W + delta, in fp32 (DoRA's ||W + s B A||_c)."""
        return torch.linalg.norm(self._oriented(self.weight).float() + delta, dim=1)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the update folded in, in fp32 and in the base's storage orientation."""
        delta = self._lora_delta()
        weight = self._oriented(self.weight).float() + delta
        if self.use_dora:
            weight = weight * (self.lora_magnitude_vector.float() / self._weight_norm(delta)).unsqueeze(1)
        return self._oriented(weight)

    # --- forward -------------------------------------------------------------------------------------------

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fan_in_fan_out:  # exactly Conv1D.forward, so a fresh adapter is bit-identical to the base
            out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
            return out.view(x.shape[:-1] + (self.out_features,))
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self._base_forward(x)
        if self.merged or not self.lora_enabled:
            return result
        lora_dtype = self.lora_A.weight.dtype
        # Under autocast the matmuls below run in the autocast dtype anyway; outside it we cast explicitly.
        lora_x = x if x.dtype == lora_dtype or torch.is_autocast_enabled(x.device.type) else x.to(lora_dtype)
        dropped = self.lora_dropout(lora_x)
        lora_out = self.lora_B(self.lora_A(dropped))
        if not self.use_dora:
            return result + (lora_out * self.scaling).to(result.dtype)
        return result + self._dora_extra(x, dropped, lora_out, result).to(result.dtype)

    def _dora_extra(self, x, dropped, lora_out, result) -> torch.Tensor:
        """DoRA's output minus the base output: (m/||W+sBA|| - 1) W x + (m/||W+sBA||) s B A x (bias aside)."""
        delta = self._lora_delta().detach()  # the norm is a constant for the gradient (DoRA paper, sec. 4.3)
        scale = (self.lora_magnitude_vector / self._weight_norm(delta)).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_out = result if self.bias is None else result - self.bias
        else:  # with dropout the base part is recomputed on the dropped-out input, as PEFT does
            base_out = F.linear(dropped.to(self.weight.dtype), self._oriented(self.weight))
        return (scale - 1) * base_out + scale * lora_out * self.scaling

    # --- merge ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (computed in fp32, cast once to W's dtype)."""
        if self.merged:
            return
        new_weight = self.checked_merged_weight()
        self._original_weight = self.weight.detach().clone() if self.use_dora else None
        self.weight.data.copy_(new_weight)
        self.merged = True

    @torch.no_grad()
    def checked_merged_weight(self) -> torch.Tensor:
        """`merged_weight()` cast to W's dtype, refused if non-finite (an fp32 value can overflow fp16)."""
        new_weight = self.merged_weight().to(self.weight.dtype)
        self._check_finite(new_weight)
        return new_weight

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.use_dora:  # DoRA's rescaling is not a plain subtraction: restore the kept original
            self.weight.data.copy_(self._original_weight)
            self._original_weight = None
        else:
            restored = self._oriented(self._oriented(self.weight).float() - self._lora_delta()).to(self.weight.dtype)
            self._check_finite(restored)
            self.weight.data.copy_(restored)
        self.merged = False

    def _check_finite(self, weight: torch.Tensor) -> None:
        if not torch.isfinite(weight).all():
            raise UserError(
                f"Merging the LoRA update into a {tuple(self.weight.shape)} weight gives non-finite values "
                "(inf or NaN). The adapter's lora_A/lora_B tensors are probably corrupt or diverged in training "
                "(check the training loss); nothing was written."
            )

    def unwrap(self) -> nn.Module:
        """The original module, holding the (possibly merged) base weight: what `merge_lora` puts back."""
        base = self._base_holder[0]
        base.weight = self.weight
        base.bias = self.bias
        return base

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return (
            f"{kind}(in={self.in_features}, out={self.out_features}), r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:.4g}, dora={self.use_dora}, merged={self.merged}"
        )
