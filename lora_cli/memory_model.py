"""What one LoRA training step holds in GPU memory, part by part: the formulas behind `lora-train --estimate`.

The model is built from its config.json on the meta device (no weights, seconds even for an 8B model) and the
real target resolution wraps its modules, so parameter counts, the LoRA parameter count and the layer widths are
exact. Activations are counted tensor by tensor: what autograd keeps for backward in one decoder layer of a
Llama-family model (pre-norm RMSNorm, SwiGLU, rotary attention) as lora-cli trains it (frozen base, LoRA as one
fused node, the chunked loss of losses.py). The list below was read off PyTorch's saved-tensor hooks on CPU and
the totals are checked against the allocator's measured peak of one training step (scripts/check_estimate.py,
docs/BENCHMARKS.md "Memory estimate"), in fp32 and under bf16 autocast (the layout of a GPU fp16/bf16 step).
Other architectures (GPT-2, GPT-NeoX, Phi: LayerNorm, GELU MLP) use the same list with a plain MLP: an
approximation, not measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .inject import LoraSettings, apply_lora, lora_layers
from .lora import is_lora_target_type
from .losses import chunk_rows, uses_plain_head

GiB = 2**30
MiB = 2**20

# NF4 with double quantization: 4 bits per weight + an 8-bit absmax per block of 64 + one fp32 second-level
# constant per 256 blocks = 4 + 8/64 + 32/(64*256) = 4.127 bits (QLoRA paper, appendix).
NF4_BITS_PER_WEIGHT = 4 + 8 / 64 + 32 / (64 * 256)
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32, one each per trainable parameter
LORA_BYTES = 4  # LoRA parameters and their gradients stay fp32 (lora.LORA_DTYPE)
FP32 = 4

# The backward pass of one decoder layer allocates gradients while that layer's saved tensors are still alive:
# in the MLP about two intermediate-wide gradients (d up, d gate; d act is freed as they are made) plus two
# hidden-wide ones in the residual stream's dtype (the gradient entering the layer and the one it passes on). Fitted to
# the measured peaks of gradient-checkpointed steps, where the recomputed top layer plus this is the peak
# (scripts/check_estimate.py); with every layer's activations kept, the head's chunk usually outweighs it.
BACKWARD_MLP_GRADS = 2
BACKWARD_HIDDEN_GRADS = 2

# On CUDA, not counted by torch.cuda.max_memory_allocated but taken from the card: the CUDA context with
# PyTorch's kernels and cuBLAS workspaces (~0.3-0.5 GiB with CUDA 12's lazy loading; scripts/gpu_check.sh prints
# the measured figure), and the caching allocator's rounding and fragmentation, taken as 10% of what changes
# during a step (the long-lived weights are allocated once and fragment little).
CUDA_CONTEXT_BYTES = 500 * MiB
ALLOCATOR_SLACK = 0.10

_ATTN_OUT_NAMES = {"o_proj", "out_proj", "dense", "c_proj", "wo", "o"}
_MLP_DOWN_NAMES = {"down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "fc_out"}
_ATTN_CONTAINER = ("attn", "attention")


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs from the architecture, all read off the meta-device model."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # key/value heads x head_dim (smaller than q_dim with grouped-query attention)
    intermediate: int
    gated_mlp: bool  # SwiGLU-style gate and up projections (Llama, Qwen2, Mistral, Gemma)
    vocab: int
    total_params: int  # tied weights once
    quantizable_params: int  # Linear weights except the output head: what load_in_4bit stores in NF4
    largest_linear: int  # elements of the largest such weight (4-bit layers dequantize one at a time)
    lora_params: int
    lora_modules: int
    lora_rank_per_layer: int  # sum of the ranks in one decoder layer: each module keeps its (tokens x r) `A x`
    lora_roles: frozenset  # inputs that autograd keeps only because LoRA needs them: attn_in/attn_out/mlp_in/mlp_out
    largest_lora_target: int  # elements of the largest wrapped weight (DoRA builds W + s B A for each)
    use_dora: bool
    head_trainable: bool  # LoRA on an untied lm_head: the loss then recomputes chunks under checkpointing
    plain_head: bool  # False: the model post-processes logits (soft-capping), so the loss takes full logits
    attn_implementation: str


@dataclass(frozen=True)
class StepShape:
    """One micro batch as the step sees it, and the dtypes it runs in."""

    micro_batch: int
    seq_len: int  # tokens in the longest row of a micro batch
    packing: bool
    checkpointing: bool
    weight_bytes: float  # per element of the frozen base weights (2 half, 4 fp32); 4-bit: of what stays unquantized
    compute_bytes: int  # activations: 2 under fp16/bf16 autocast, 4 in fp32
    load_in_4bit: bool = False
    cuda: bool = True  # add the CUDA context and allocator slack
    padded: bool = True  # unpacked rows of different lengths: the batch carries an attention mask

    @property
    def activation_bytes(self) -> float:
        """Per element of the decoder's activations. bitsandbytes' 4-bit layers return their input's dtype, not
        autocast's: beside fp32 norms (model.dtype=float32) the projections' outputs, and all that follows them,
        are fp32 too. nn.Linear layers compute in the autocast dtype whatever their weights."""
        return max(self.weight_bytes, self.compute_bytes) if self.load_in_4bit else self.compute_bytes

    @property
    def masked(self) -> bool:
        return self.padded and self.micro_batch > 1 and not self.packing


def model_facts(model, settings: LoraSettings) -> ModelFacts:
    """Facts of a meta-device model; wraps it with LoRA exactly as lora-train would (same target resolution)."""
    config = model.config
    text = getattr(config, "get_text_config", lambda: config)() or config
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(n, m) for n, m in model.named_modules() if is_lora_target_type(m) and m is not head]
    quantizable = sum(m.weight.numel() for _, m in linears)
    largest = max((m.weight.numel() for _, m in linears), default=0)
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    intermediate, gated = _mlp_shape(linears, hidden)
    total = sum(p.numel() for p in model.parameters())
    report = apply_lora(model, settings)
    wrapped = lora_layers(model)
    layer_count = int(text.num_hidden_layers)
    roles = {_role(path) for path in wrapped}
    head_path = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    return ModelFacts(
        model_type=str(getattr(config, "model_type", "?")),
        hidden=hidden, layers=layer_count, heads=heads, q_dim=heads * head_dim, kv_dim=kv_heads * head_dim,
        intermediate=intermediate, gated_mlp=gated, vocab=int(text.vocab_size), total_params=total,
        quantizable_params=quantizable, largest_linear=largest, lora_params=report.trainable_params,
        lora_modules=len(wrapped),
        lora_rank_per_layer=round(sum(layer.r for path, layer in wrapped.items() if path != head_path) / layer_count),
        lora_roles=frozenset(roles - {"head"}),
        largest_lora_target=max((layer.weight.numel() for layer in wrapped.values()), default=0),
        use_dora=settings.use_dora, head_trainable=head_path in wrapped,
        plain_head=uses_plain_head(model), attn_implementation=str(getattr(config, "_attn_implementation", "sdpa")),
    )


def _mlp_shape(linears, hidden: int) -> tuple[int, bool]:
    """(intermediate width, gated?) from the first decoder layer's MLP projections."""
    first_layer = [(n, m) for n, m in linears if ".0." in f".{n}." and not _in_attention(n)]
    widths = [_out_in(m) for _, m in first_layer]
    if not widths:
        return 4 * hidden, False
    intermediate = max(in_f for _, in_f in widths)  # the down projection reads the intermediate activations
    if intermediate == hidden:  # no down projection seen (fused or unusual): take the widest output
        intermediate = max(out_f for out_f, _ in widths)
    gated = sum(out_f == intermediate for out_f, _ in widths) >= 2 or any(
        out_f == 2 * intermediate for out_f, _ in widths
    )
    return intermediate, gated


def _out_in(module) -> tuple[int, int]:
    out_f, in_f = module.weight.shape
    return (out_f, in_f) if isinstance(module, torch.nn.Linear) else (in_f, out_f)  # Conv1D stores (in, out)


def _in_attention(path: str) -> bool:
    container = path.rsplit(".", 2)[-2] if path.count(".") else ""
    return any(word in container.lower() for word in _ATTN_CONTAINER)


def _role(path: str) -> str:
    leaf = path.rsplit(".", 1)[-1]
    if "." not in path or not any(ch.isdigit() for ch in path):
        return "head"
    if _in_attention(path):
        return "attn_out" if leaf in _ATTN_OUT_NAMES else "attn_in"
    return "mlp_out" if leaf in _MLP_DOWN_NAMES else "mlp_in"


# --- the parts ---------------------------------------------------------------------------------------------


def weight_bytes(facts: ModelFacts, shape: StepShape) -> int:
    if shape.load_in_4bit:  # norms, embeddings and the head stay in model.dtype (models.load_base_model's `dtype`)
        rest = facts.total_params - facts.quantizable_params
        return round(facts.quantizable_params * NF4_BITS_PER_WEIGHT / 8 + rest * shape.weight_bytes)
    return round(facts.total_params * shape.weight_bytes)


def layer_activation_bytes(facts: ModelFacts, shape: StepShape) -> int:
    """Bytes one decoder layer keeps for backward over a micro batch, without checkpointing.

    Per token (c = compute bytes): both norms keep their input as an fp32 copy (RMSNorm upcasts; 2 x 4h) plus a
    scalar each; attention keeps rotated q and k, v and its output (sdpa: 2 q_dim + 2 kv_dim, times c) and a
    log-sum-exp per head (fp32); a SwiGLU MLP keeps gate, act(gate) and up (3 i x c; a plain MLP 2 i). The frozen
    projections keep nothing of their input: only LoRA makes autograd keep the normed input (h) of the q/k/v or
    gate/up projections, down_proj's input (i), and every module's A x (r).
    """
    c, tokens, seq = shape.activation_bytes, shape.micro_batch * shape.seq_len, shape.seq_len
    per_token = 2 * facts.hidden * FP32 + 2 * FP32
    masked = shape.masked
    if facts.attn_implementation == "eager":
        # Repeated k and v for the matmuls (q_dim each) and the softmax probabilities: fp32 from softmax(dtype=
        # float32), plus their cast back to the compute dtype that the second matmul keeps.
        per_token += 2 * facts.q_dim * c + facts.heads * seq * (FP32 + (c if c < FP32 else 0))
        per_token += facts.q_dim * c * ("attn_out" in facts.lora_roles)  # the transposed output, a copy
    else:
        # A padded batch gives sdpa a mask: transformers then repeats k and v to every query head (its grouped-
        # query path needs mask-free calls), and sdpa turns the boolean mask into an additive one in the query's
        # dtype in every layer, kept for backward (seq x c per token). Packed rows attend per example, unmasked.
        # sdpa's output is already laid out as (batch, seq, heads, dim), so o_proj's LoRA input is that tensor.
        # Autocast casts sdpa's inputs to the compute dtype: what it keeps is in that dtype even when the
        # projections around it give fp32 (a 4-bit base with fp32 norms).
        kv = facts.q_dim if masked else facts.kv_dim
        per_token += ((2 * facts.q_dim + 2 * kv) * shape.compute_bytes + facts.heads * FP32
                      + (seq * c if masked else 0))
    per_token += (3 if facts.gated_mlp else 2) * facts.intermediate * c
    roles = facts.lora_roles
    per_token += facts.lora_rank_per_layer * c
    per_token += c * (facts.hidden * ("attn_in" in roles) + facts.hidden * ("mlp_in" in roles)
                      + facts.intermediate * ("mlp_out" in roles))
    if facts.use_dora:  # the unfused DoRA path keeps the base and LoRA outputs of each module (not measured)
        per_token += 2 * c * (facts.q_dim + facts.intermediate) * len(roles)
    return per_token * tokens


def _residual_bytes(shape: StepShape) -> float:
    """The residual stream's dtype is the embedding's: the base dtype (model.dtype), with or without 4-bit layers
    (the layers add their compute-dtype outputs to it, which keeps the wider of the two)."""
    return max(shape.weight_bytes, shape.compute_bytes) if shape.load_in_4bit else shape.weight_bytes


def saved_bytes(facts: ModelFacts, shape: StepShape) -> int:
    """What the forward pass leaves for backward: every layer's saved tensors, or with checkpointing only each
    layer's input (the residual stream), plus a padded batch's attention mask (one byte per query-key pair)."""
    tokens = shape.micro_batch * shape.seq_len
    mask = shape.micro_batch * shape.seq_len**2 if shape.masked else 0
    if shape.checkpointing:
        return round((facts.layers + 1) * tokens * facts.hidden * _residual_bytes(shape)) + mask
    return facts.layers * layer_activation_bytes(facts, shape) + mask


def backward_bytes(facts: ModelFacts, shape: StepShape) -> int:
    """The backward pass's own peak on top of the saved tensors: one layer's gradients, and with checkpointing the
    recomputed layer's activations (one layer at a time)."""
    tokens = shape.micro_batch * shape.seq_len
    extra = tokens * (BACKWARD_MLP_GRADS * facts.intermediate * shape.compute_bytes
                      + BACKWARD_HIDDEN_GRADS * facts.hidden * _residual_bytes(shape))
    if shape.load_in_4bit:  # each 4-bit layer dequantizes its weight for the matmul, forward and backward
        extra += facts.largest_linear * shape.compute_bytes
    if facts.use_dora:  # DoRA forms W + s B A (fp32) for the weight norm of each module it runs
        extra += 2 * facts.largest_lora_target * FP32
    if shape.checkpointing:
        extra += layer_activation_bytes(facts, shape)
    return extra


def head_bytes(facts: ModelFacts, shape: StepShape) -> int:
    """The output head and loss at their peak (losses.py): only trained positions reach the head, in chunks of
    CHUNK_BYTES fp32 logits; worst case every position is trained."""
    c = shape.compute_bytes
    tokens = shape.micro_batch * shape.seq_len
    n = shape.micro_batch * (shape.seq_len - 1)
    if not facts.plain_head:  # transformers' full logits: half logits, their fp32 upcast, the fp32 gradient
        return tokens * facts.vocab * (c + 2 * FP32)
    rows = min(chunk_rows(facts.vocab), n)
    # The decoder's last hidden state stays referenced; the trained rows are gathered, and their gradient is
    # computed in forward (same size); one fp32 logits buffer is reused for all chunks, and in half precision
    # each chunk's half logits (then its probabilities cast back) exist beside it.
    total = tokens * facts.hidden * c + 2 * n * facts.hidden * c + rows * facts.vocab * FP32
    if c < FP32:
        total += rows * facts.vocab * c
    if shape.weight_bytes != c:  # a head stored in another dtype is cast to the compute dtype once per step
        total += facts.vocab * facts.hidden * c
    if facts.head_trainable:  # checkpointed chunks: each chunk's logits again in backward, and their gradient
        total += rows * facts.vocab * 2 * FP32
    return round(total)


def step_parts(facts: ModelFacts, shape: StepShape) -> dict[str, int]:
    """Peak GPU memory of a training step, by part (bytes).

    The step peaks either at the head, right after the last layer's forward while every saved tensor is alive, or
    early in the backward pass (the saved tensors plus `backward_bytes`); whichever is larger. So "activations" is
    the saved tensors plus whatever the backward pass needs beyond the head's peak.
    """
    lora = facts.lora_params
    head = head_bytes(facts, shape)
    activations = saved_bytes(facts, shape) + max(0, backward_bytes(facts, shape) - head)
    parts = {
        "base weights": weight_bytes(facts, shape),
        "LoRA parameters": lora * LORA_BYTES,
        "LoRA gradients": lora * LORA_BYTES,
        "AdamW states": lora * LORA_BYTES * ADAM_STATES,
        "activations": activations,
        "output head + loss": head,
    }
    if shape.cuda:
        parts["CUDA context + allocator"] = CUDA_CONTEXT_BYTES + round(ALLOCATOR_SLACK * (activations + head))
    return parts
