"""FSDP: the base model's weights sharded across processes (FSDP2, `fully_shard`, through Accelerate).

Each decoder layer is one FSDP unit; the embedding, final norm and output head sit in the root unit (the loss
module `CausalLMLoss`, which is what Accelerate prepares). Every process keeps 1/N of each unit's weights and
all-gathers a unit just before it computes, so a base N times larger than one process's memory trains. The LoRA
parameters are sharded and trained in fp32 like the rest of the units; the frozen base stays in its dtype (no
`MixedPrecisionPolicy` casts: autocast computes in the half type exactly as under DDP).

Turned on by `train.fsdp: true` (for torchrun, or `accelerate launch` without an FSDP config) or by an Accelerate
config with `distributed_type: FSDP` and `fsdp_version: 2` (configs/accelerate/fsdp_2gpu.yaml). Accelerate drives
FSDP on GPUs only; on CPU processes (gloo) the same Accelerate code runs unchanged once told that this is an FSDP
run, which is how tests/test_fsdp.py trains FSDP without a GPU.

Loading: with FSDP's CPU-RAM-efficient loading (always on for train.fsdp) only the first process reads the weights;
the others build the model on the meta device, and Accelerate broadcasts the weights tensor by tensor and keeps each
process's shard. Everything that reads or writes whole tensors goes through a `Sharding` here: the adapter and the
optimizer state are gathered from the shards (LoRA tensors only: never the whole base) before the main process
writes them, in the same layout as a one-process run's, so a checkpoint resumes under FSDP or without it.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from ..errors import UserError
from ..inject import lora_layers, lora_state_dict

FSDP_ENV = "ACCELERATE_USE_FSDP"  # what `accelerate launch` with an FSDP config sets; transformers reads it too


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def wanted(cfg) -> bool:
    """train.fsdp, or an Accelerate config with FSDP (`accelerate launch` puts it in the environment)."""
    return cfg.train.fsdp or os.environ.get(FSDP_ENV, "").lower() == "true"


def accelerator_kwargs(cfg) -> dict:
    """Accelerator arguments for FSDP under several processes: the FSDP2 plugin, made before the model loads, since
    the plugin tells transformers (through the environment) to read the weights on the first process only."""
    if not wanted(cfg) or world_size() == 1:
        return {}
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if os.environ.get(FSDP_ENV, "").lower() == "true":
        plugin = FullyShardedDataParallelPlugin()  # the Accelerate config's settings, from the environment
    else:
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",  # one unit per decoder layer (the model's _no_split_modules)
            reshard_after_forward=True,  # free each layer's gathered weights after its forward (ZeRO-3)
            cpu_ram_efficient_loading=True,
            state_dict_type="FULL_STATE_DICT",
        )
    # No casts: the base computes in its dtype, LoRA in fp32, autocast in the half type, exactly as under DDP (an
    # Accelerate policy would cast the fp32 LoRA weights to the half type and reduce their gradients in it).
    plugin.mixed_precision_policy = MixedPrecisionPolicy()
    return {"fsdp_plugin": plugin}


def sharding_for(accelerator, cfg, accelerator_kwargs: dict, say) -> "Sharding":
    """The Sharding for this run: FSDP when train.fsdp or Accelerate's config asks for it (several processes);
    otherwise none (one process, or DDP). `accelerator_kwargs`: what accelerator_kwargs gave."""
    from accelerate.utils import DistributedType

    kind, use_fsdp = accelerator.distributed_type, wanted(cfg)
    if use_fsdp and kind == DistributedType.MULTI_CPU and "fsdp_plugin" in accelerator_kwargs:
        # Accelerate sets FSDP up for GPU-like devices only; its FSDP2 code runs on gloo as it is.
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = accelerator_kwargs["fsdp_plugin"]
        kind = DistributedType.FSDP
    if kind != DistributedType.FSDP:
        if use_fsdp and accelerator.num_processes == 1:
            asked = "train.fsdp=true" if cfg.train.fsdp else "FSDP (the Accelerate config's)"
            say(f"note: {asked} in one process shards nothing, so this run trains as usual. To shard the "
                "base over N GPUs, launch it with torchrun --nproc_per_node N -m lora_cli train ... (or accelerate "
                "launch --config_file configs/accelerate/fsdp_2gpu.yaml -m lora_cli train ...).", markup=False)
        return Sharding()
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise UserError(
            f"The Accelerate config asks for FSDP version {plugin.fsdp_version}; lora-train shards with FSDP2 only. "
            "Set `fsdp_version: 2` under fsdp_config in the config file (see configs/accelerate/fsdp_2gpu.yaml)."
        )
    if cfg.model.load_in_4bit:
        raise UserError(qlora_refusal())
    return FsdpSharding(accelerator, plugin, say)


def qlora_refusal() -> str:
    # Found on CPU (torch 2.13, bitsandbytes 0.50, gloo): 4-bit weights stored as a float dtype
    # (bnb_4bit_quant_storage) do shard under FSDP2 and compute exactly (bitsandbytes re-attaches the quantization
    # state to the gathered weight), but transformers loads a quantized model whole on every process (no
    # CPU-RAM-efficient loading for it), and a LoRA layer computes a 4-bit base through the module it wraps, whose
    # weight is the whole original: neither would save memory yet.
    return (
        "model.load_in_4bit (QLoRA) together with FSDP is not supported by lora-train yet: every process would still "
        "load and keep the whole 4-bit base, so sharding would save no memory. Either train the 16-bit base with "
        "FSDP (drop model.load_in_4bit: two GPUs then hold half of it each), or keep QLoRA with plain data "
        "parallelism (drop train.fsdp, and launch without the FSDP Accelerate config)."
    )


class Sharding:
    """No sharding (one process, or DDP): every process holds whole tensors, so reading and writing them is plain."""

    active = False

    def load_base(self, whole, shapes):
        """The frozen base model: whole() loads it with its weights; shapes() builds it without them."""
        return whole()

    def prepare_model(self, model) -> None:
        """Before accelerator.prepare: nothing to set up."""

    def prepared(self, loss_model) -> None:
        """After accelerator.prepare: nothing to set up."""

    def call_model(self, model, fn):
        """fn(model), where the model runs outside the loss module's forward (under FSDP every process calls)."""
        return fn(model)

    def lora_tensors(self, model) -> dict[str, torch.Tensor]:
        """The adapter's tensors, whole (keys as lora_state_dict's). Under FSDP a collective: every process calls."""
        return {k: v.detach() for k, v in lora_state_dict(model).items()}

    def load_lora_tensors(self, model, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, tensor in tensors.items():
                params[key].copy_(tensor)

    def optimizer_state(self, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def generation(self, run):
        """What sample answers run under: only the main process generates (the others wait)."""
        return contextlib.nullcontext(run.main)

    def resident_bytes(self, model) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())


class FsdpSharding(Sharding):
    """FSDP2: parameters are DTensors sharded over the processes (dimension 0). Whole tensors are gathered from or
    scattered to the shards; every method that gathers is a collective, called by every process in the same order."""

    active = True

    def __init__(self, accelerator, plugin, say):
        self.accelerator, self.plugin, self.say = accelerator, plugin, say
        self.loss_model = None

    def load_base(self, whole, shapes):
        """With CPU-RAM-efficient loading only process 0 loads the weights: Accelerate moves every other process's
        model to the meta device and broadcasts process 0's tensors into the shards. So the others build theirs
        without weights (transformers 5 would load and convert the whole model on every process: each one's peak
        memory would hold the whole base). Their layout (names, shapes and dtypes, the computed buffers Accelerate
        keeps) must be process 0's, or the broadcasts would not match: it is compared here, and a process whose
        layout differs loads the whole model after all. A collective: every process calls it."""
        import torch.distributed as dist

        if not self.plugin.cpu_ram_efficient_loading:
            return whole()
        main, failure, model = self.accelerator.is_main_process, None, None
        try:
            model = whole() if main else shapes()
        except Exception as err:  # process 0's error is every process's (they wait for it); the others retry
            failure = err
        mine = _layout(model) if failure is None else (str(failure), isinstance(failure, UserError))
        layouts = [None] * self.accelerator.num_processes
        dist.all_gather_object(layouts, mine)
        if main and failure is not None:
            raise failure
        if isinstance(layouts[0], tuple):  # process 0's error: the same message from every process
            text, user_error = layouts[0]
            raise UserError(text) if user_error else RuntimeError(f"process 0 could not load the model: {text}")
        differ = [rank for rank, layout in enumerate(layouts) if layout != layouts[0]]
        if differ:
            which = "process " + ", ".join(map(str, differ))
            self.say(f"note: the model {which} built without weights differs from process 0's "
                     f"({_first_difference(layouts[0], layouts[differ[0]], which)}), so it loads the whole model "
                     "from disk too.", markup=False)
        return whole() if self.accelerator.process_index in differ else model

    def prepare_model(self, model) -> None:
        """One FSDP unit per decoder layer: the classes the model names in _no_split_modules, unless the Accelerate
        config names its own (fsdp_transformer_layer_cls_to_wrap). The LoRA layers let go of the base weights they
        hold for unwrapping, so the whole weights are freed once sharded."""
        for layer in lora_layers(model).values():
            layer.release_base_references()
        if self.plugin.transformer_cls_names_to_wrap:
            return
        names = list(getattr(model, "_no_split_modules", None) or [])
        present = {type(m).__name__ for m in model.modules()}
        layers = [n for n in names if n in present]
        if not layers:
            raise UserError(
                f"FSDP shards the model one decoder layer at a time, and {type(model).__name__} does not say which "
                "class its decoder layers are (transformers' _no_split_modules). Name it in the Accelerate config: "
                "fsdp_transformer_layer_cls_to_wrap: <the decoder layer class>, and launch with accelerate launch "
                "--config_file <that file>."
            )
        self.plugin.transformer_cls_names_to_wrap = layers

    def prepared(self, loss_model) -> None:
        """After accelerator.prepare: what runs the model outside the loss (generation, the packing check) must
        gather the root unit's weights (embedding, head) as the loss module's forward does."""
        from torch.distributed.fsdp import register_fsdp_forward_method

        self.loss_model = loss_model
        register_fsdp_forward_method(loss_model, "call_model")

    def call_model(self, model, fn):
        return self.loss_model.call_model(fn)

    def _reshard(self) -> None:
        """Every unit back to its shards. The root unit stays gathered after a forward; writes into gathered
        weights would be lost at the next reshard, and reads must see the registered (sharded) parameters."""
        from torch.distributed.fsdp import FSDPModule

        if self.loss_model is None:
            return
        for module in self.loss_model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def lora_tensors(self, model) -> dict[str, torch.Tensor]:
        self._reshard()
        return {key: _whole(value).to("cpu") for key, value in lora_state_dict(model).items()}

    def load_lora_tensors(self, model, tensors: dict[str, torch.Tensor]) -> None:
        self._reshard()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, tensor in tensors.items():
                params[key].copy_(_like(params[key], tensor))

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer's state_dict with every sharded moment gathered whole: the layout one process writes (its
        parameters are indexed in the same order), small since only LoRA parameters are optimized."""
        state = optimizer.state_dict()
        return {**state, "state": {index: {name: _whole(value).to("cpu") if torch.is_tensor(value) else value
                                           for name, value in entry.items()}
                                   for index, entry in sorted(state["state"].items())}}

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        shards = {}
        for index, entry in state["state"].items():
            param = params[index]
            shards[index] = {name: _like(param, value) if torch.is_tensor(value) and value.shape == param.shape
                             else value for name, value in entry.items()}
        optimizer.load_state_dict({**state, "state": shards})

    @contextlib.contextmanager
    def generation(self, run):
        """Every process generates (each layer's forward gathers its weights: a collective), the main one keeps the
        answers. synced_gpus keeps them stepping together until the last one has finished."""
        model, loss_model = run.model, self.loss_model
        model.generate = functools.partial(loss_model.call_model, model.__class__.generate, synced_gpus=True)
        try:
            yield True
        finally:
            del model.generate  # the class's own method again

    def resident_bytes(self, model) -> int:
        """Bytes of parameters this process holds: its shards."""
        self._reshard()
        return sum(_local(p).numel() * p.element_size() for p in model.parameters())


def _layout(model) -> list:
    """What must agree between process 0's loaded model and another's built one: every state_dict entry's name,
    shape and dtype, and the buffers that are no state_dict entry (Accelerate keeps each process's own) by value."""
    computed = {f"{prefix}.{name}".lstrip(".") for prefix, module in model.named_modules()
                for name in module._non_persistent_buffers_set}
    rows = [(name, tuple(t.shape), str(t.dtype)) for name, t in model.state_dict().items()]
    return rows + [(name, tuple(b.shape), str(b.dtype), "meta" if b.is_meta else float(b.double().sum()))
                   for name, b in model.named_buffers() if name in computed]


def _first_difference(expected: list, got, which: str) -> str:
    if isinstance(got, tuple):  # building it failed: the error
        return got[0]
    first = next((a, b) for a, b in zip(expected + [None], got + [None]) if a != b)
    return f"process 0 has {first[0]}, {which} {first[1]}"


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` laid out as `param`: this process's shard of it for a sharded parameter (no communication: every
    process holds the whole tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    whole = whole.to(device=param.device, dtype=param.dtype)
    if not isinstance(param, DTensor):
        return whole
    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)


def sharded_line(sharding: Sharding, model, world: int) -> str:
    """What the user is told about the sharding: the weights this process holds, of the whole model's."""
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    mine = sharding.resident_bytes(model)
    return (f"FSDP: the model's weights sharded over {world} processes, one unit per decoder layer: "
            f"{_size(mine)} held by each, of {_size(whole)}")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.3f} MiB"
