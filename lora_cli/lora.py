"""The LoRA layer: y = W x + b + scaling * B A dropout(x), with optional rsLoRA and DoRA.

`LoraLinear` wraps an existing `nn.Linear` or transformers `Conv1D` (GPT-2 stores W as (in, out)). It adopts the
base module's own `weight` and `bias` Parameters under the same names: no copy, and the model's state_dict keys of
the base weights stay exactly as they were (`...q_proj.weight`), which keeps checkpoints, `save_pretrained` and
distributed wrappers working. The LoRA tensors live beside them as `lora_A.weight`, `lora_B.weight` and (DoRA)
`lora_magnitude_vector`, which are also the names PEFT writes, prefixed with `base_model.model.`.

QLoRA: the base may be a bitsandbytes `Linear4bit` (NF4 weights packed two per byte, `weight.quant_state` to
dequantize them). Then the base output is that module's own forward (dequantize + 16-bit GEMM), the LoRA branch
is the same fp32 one, and the shapes come from its in/out features, not from the packed weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config.schema import INIT_CHOICES
from .errors import UserError

try:  # transformers' GPT-2 style linear layer: weight (in, out), "fan-in fan-out"
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always ships it
    Conv1D = ()

LORA_DTYPE = torch.float32  # trainable params stay fp32 even on an fp16 base: fp16 AMP cannot unscale fp16 grads


def is_4bit_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (QLoRA's frozen base), recognised without importing bitsandbytes."""
    return isinstance(module, nn.Linear) and getattr(module.weight, "quant_state", None) is not None


def is_lora_target_type(module: nn.Module) -> bool:
    """The module kinds LoRA can wrap. Of bitsandbytes' layers only 4-bit ones: an 8-bit layer subclasses
    nn.Linear too, but its int8 weight is not W."""
    if type(module).__module__.startswith("bitsandbytes"):
        return is_4bit_linear(module)
    return isinstance(module, nn.Linear) or (Conv1D != () and isinstance(module, Conv1D))


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def merged_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool = False,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """W + scaling * B A in fp32, in W's storage orientation (Conv1D stores W as (in, out)); with DoRA's
    `magnitude` m, each output row is rescaled: m / ||W + s B A|| * (W + s B A).

    The one merge formula: LoraLinear.merge and lora-merge's shard-by-shard path both call it.
    """
    delta = (lora_B.float() @ lora_A.float()) * scaling
    merged = (weight.t() if fan_in_fan_out else weight).float() + delta
    if magnitude is not None:
        merged = merged * (magnitude.float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
    return merged.t() if fan_in_fan_out else merged


class LoraLinear(nn.Module):
    """A Linear/Conv1D with a low-rank update. Build it with `LoraLinear.from_base(module, ...)`."""

    # The fused autograd node (`_FusedLoraLinear`) wherever it applies; False forces the plain composition of
    # modules (the reference the tests compare the fused node against).
    use_fused = True

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
        self.quantized = is_4bit_linear(base)  # W is packed 4-bit: base.weight.shape is not (out, in)
        # adapter_config.json's fan_in_fan_out describes the checkpoint's layer, whatever it was loaded as: a 4-bit
        # layer transformers made from a Conv1D (it transposes the weight and keeps the class as `source_cls`)
        # counts as the Conv1D, so a QLoRA adapter says what a 16-bit run on the same base says. A and B are
        # (r, in) and (out, r) either way; PEFT reads the flag only to merge into a Conv1D.
        source = getattr(base, "source_cls", None)
        self.checkpoint_fan_in_fan_out = self.fan_in_fan_out or (
            isinstance(source, type) and issubclass(source, nn.Module) and not issubclass(source, nn.Linear))
        out_features, in_features = (
            (base.out_features, base.in_features) if self.quantized else self._oriented(base.weight).shape
        )
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
        return weight.t() if self.fan_in_fan_out else weight

    def _lora_delta(self) -> torch.Tensor:
        """scaling * B A in fp32, shape (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def dense_weight(self) -> torch.Tensor:
        """W as (out, in) in a floating dtype: W itself, or for a 4-bit base a fresh dequantized copy."""
        if not self.quantized:
            return self._oriented(self.weight)
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(self.weight.data, self.weight.quant_state)

    def _weight_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """Row norms of W + delta, in fp32 (DoRA's ||W + s B A||_c)."""
        return torch.linalg.norm(self.dense_weight().float() + delta, dim=1)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the update folded in, in fp32 and in the base's storage orientation (for a 4-bit
        base: from the dequantized weight, (out, in))."""
        magnitude = self.lora_magnitude_vector if self.use_dora else None
        weight = self.dense_weight() if self.quantized else self.weight
        return merged_weight(weight, self.lora_A.weight, self.lora_B.weight, self.scaling, self.fan_in_fan_out,
                             magnitude)

    # --- forward -------------------------------------------------------------------------------------------

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:  # Linear4bit's own forward: x in its compute dtype, dequantize, GEMM, back to x's dtype
            return self._base_holder[0](x)
        if self.fan_in_fan_out:  # exactly Conv1D.forward, so a fresh adapter is bit-identical to the base
            rows = x.reshape(-1, x.size(-1))
            out = torch.mm(rows, self.weight) if self.bias is None else torch.addmm(self.bias, rows, self.weight)
            return out.view(x.shape[:-1] + (self.out_features,))
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.lora_enabled:
            return self._base_forward(x)
        compute_dtype = self._fused_compute_dtype(x)
        if compute_dtype is not None:
            return self._fused_forward(x, compute_dtype)
        result = self._base_forward(x)
        lora_dtype = self.lora_A.weight.dtype
        # Under autocast the matmuls below run in the autocast dtype anyway; outside it we cast explicitly.
        lora_x = x if x.dtype == lora_dtype or torch.is_autocast_enabled(x.device.type) else x.to(lora_dtype)
        dropped = self.lora_dropout(lora_x)
        lora_out = self.lora_B(self.lora_A(dropped))
        if not self.use_dora:
            return result + (lora_out * self.scaling).to(result.dtype)
        return result + self._dora_extra(x, dropped, lora_out, result).to(result.dtype)

    def _fused_compute_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the fused path would compute in, or None where the plain autograd path must run.

        The fused path needs a frozen base (it never computes W's gradient), the plain LoRA formula (DoRA rescales
        the base output), and one dtype for x, W and the LoRA weights: the autocast dtype under autocast (what
        autocast would cast each matmul's operands to anyway), else the common dtype. An fp16 base with fp32 LoRA
        outside autocast (inference on an unmerged adapter) keeps the plain path and its fp32 LoRA arithmetic.
        DeepSpeed ZeRO-3 partitions lora_A/lora_B and gathers them only when their own modules are called, which the
        fused path does not do.
        """
        trainable_base = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if not self.use_fused or self.use_dora or trainable_base or hasattr(self.lora_A.weight, "ds_id"):
            return None
        if self.quantized:  # no W to multiply by: the plain path, whose base part is Linear4bit's own forward
            return None
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            return dtype if x.is_floating_point() else None
        dtype = self.lora_A.weight.dtype
        same = x.dtype == self.weight.dtype == dtype == self.lora_B.weight.dtype
        return dtype if same and (self.bias is None or self.bias.dtype == dtype) else None

    def _fused_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W x + b + s B A drop(x) in one autograd node: see `_FusedLoraLinear` for what it saves."""
        dropped = self.lora_dropout(x)
        lora_x = None if dropped is x else dropped.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        # Casts outside the fused node are autograd ops: gradients reach the fp32 LoRA params in fp32, as with
        # autocast's own casts. They are no-ops when the dtypes already agree (fp32 on CPU).
        with torch.autocast(x.device.type, enabled=False):
            return _FusedLoraLinear.apply(
                x.to(dtype), lora_x, self.weight.to(dtype), bias, self.lora_A.weight.to(dtype),
                self.lora_B.weight.to(dtype), self.scaling, self.fan_in_fan_out,
            )

    def _dora_extra(self, x, dropped, lora_out, result) -> torch.Tensor:
        """DoRA's output minus the base output: (m/||W+sBA|| - 1) W x + (m/||W+sBA||) s B A x (bias aside)."""
        delta = self._lora_delta().detach()  # the norm is a constant for the gradient (DoRA paper, sec. 4.3)
        scale = (self.lora_magnitude_vector / self._weight_norm(delta)).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_out = result if self.bias is None else result - self.bias
        elif self.quantized:
            base_out = self._base_forward(dropped.to(x.dtype))
            base_out = base_out if self.bias is None else base_out - self.bias
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
        # DoRA's merged rows are (W + s B A) * m / ||W + s B A||: keep that per-row factor (one value per output
        # row, as PEFT caches the norm) so unmerge can divide it out, instead of a copy of the whole weight
        self._dora_factor = self._dora_scale() if self.use_dora else None
        self.weight.data.copy_(new_weight)
        self.merged = True

    def _dora_scale(self) -> torch.Tensor:
        """m / ||W + s B A|| per output row, in fp32."""
        return self.lora_magnitude_vector.detach().float() / self._weight_norm(self._lora_delta())

    @torch.no_grad()
    def checked_merged_weight(self) -> torch.Tensor:
        """`merged_weight()` cast to W's dtype, refused if non-finite (an fp32 value can overflow fp16)."""
        if self.quantized:
            raise UserError(
                "An adapter cannot be merged into a 4-bit (QLoRA) base in memory: the merged weights would have to "
                "be rounded to 4 bits again, which changes the model, or held in 16 bits, which undoes the saving. "
                "Use the adapter unmerged (lora-generate without --merge), or merge it into the unquantized base "
                "with lora-merge ADAPTER_DIR OUTPUT_DIR and use that folder."
            )
        new_weight = self.merged_weight().to(self.weight.dtype)
        self._check_finite(new_weight)
        return new_weight

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        merged = self._oriented(self.weight).float()
        if self.use_dora:  # DoRA scaled each row after adding the update: undo the scaling first
            merged = merged / self._dora_factor.unsqueeze(1)
            self._dora_factor = None
        restored = self._oriented(merged - self._lora_delta()).to(self.weight.dtype)
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
        kind = "Linear4bit" if self.quantized else "Conv1D" if self.fan_in_fan_out else "Linear"
        return (
            f"{kind}(in={self.in_features}, out={self.out_features}), r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:.4g}, dora={self.use_dora}, merged={self.merged}"
        )


class _FusedLoraLinear(torch.autograd.Function):
    """y = x W^T + b + s (drop(x) A^T) B^T for a frozen W, as one autograd node.

    The plain composition (`result + lora_B(lora_A(x)) * s`) makes two full (tokens x out) temporaries in forward
    (B's output and its scaled copy) and, in backward, a scaled copy of the incoming gradient plus a separate
    (tokens x in) gradient for each branch that autograd then adds. Here the LoRA term is accumulated into the base
    output by one in-place addmm, the scale is applied to the small (tokens x r) A x and (out x r) B before they
    enter a product (in fp16 with s < 1, scaling a product afterwards overflows where the plain path does not), and
    the LoRA input gradient is accumulated into the base input gradient by another addmm. Saved for backward: the
    LoRA input (which lora_A's gradient needs in either form) and s A x (tokens x r).

    `lora_x` is None when the LoRA branch sees x itself (no dropout); `fan_in_fan_out`: W stored as (in, out).
    """

    @staticmethod
    def forward(ctx, x, lora_x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out):
        rows = x.reshape(-1, x.shape[-1])
        lora_rows = rows if lora_x is None else lora_x.reshape(-1, x.shape[-1])
        w = weight if fan_in_fan_out else weight.t()  # (in, out)
        out = torch.mm(rows, w) if bias is None else torch.addmm(bias, rows, w)
        # s A x: scaled while it is the small (tokens x r) tensor, so no product below is ever larger than the
        # scaled result (in fp16, an unscaled product overflows first when s < 1).
        scaled_a = torch.mm(lora_rows, lora_A.t()).mul_(scaling)
        out.addmm_(scaled_a, lora_B.t())
        ctx.save_for_backward(lora_rows, scaled_a, weight, lora_A, lora_B)
        ctx.scaling, ctx.fan_in_fan_out, ctx.separate_lora_x = scaling, fan_in_fan_out, lora_x is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        lora_rows, scaled_a, weight, lora_A, lora_B = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, need_lora_x, _, _, need_A, need_B = ctx.needs_input_grad[:6]
        grad_x = grad_lora_x = grad_A = grad_B = None
        if need_B:
            grad_B = torch.mm(g.t(), scaled_a)  # (out, r)
        # d loss / d (A x) = s g B: (tokens, r), with s applied to the small (out x r) B before the product, for the
        # same reason as in forward (the scaled loss's gradients sit near the top of fp16's range).
        g_a = torch.mm(g, lora_B * ctx.scaling)
        if need_A:
            grad_A = torch.mm(g_a.t(), lora_rows)  # (r, in)
        shape = grad_out.shape[:-1] + (lora_A.shape[1],)
        if need_x:
            grad_x = torch.mm(g, weight.t() if ctx.fan_in_fan_out else weight)  # (tokens, in)
            if not ctx.separate_lora_x:
                grad_x.addmm_(g_a, lora_A)
            grad_x = grad_x.view(shape)
        if ctx.separate_lora_x and need_lora_x:
            grad_lora_x = torch.mm(g_a, lora_A).view(shape)
        return grad_x, grad_lora_x, None, None, grad_A, grad_B, None, None
