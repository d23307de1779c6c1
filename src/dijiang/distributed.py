"""FSDP2 for `dijiang train`: torch's `fully_shard`, applied by accelerate's FSDP plugin.

`accelerate launch --config_file configs/accelerate_fsdp.yaml -m dijiang train ...` sets ACCELERATE_USE_FSDP and the
FSDP_* variables; `fsdp_accelerator` turns them into an Accelerator whose plugin shards the student and the frozen
teacher (each decoder layer and each converted attention module is its own unit, full shard, bf16 compute on GPU).

What sharding changes in the loop, and how this module handles it:
- the optimizer is built after sharding, from the sharded parameters, grouped by name (ids change when
  `fully_shard` replaces parameters by DTensors), so the DiJiang parameters keep their own learning rate
  (`train._stage_setup`);
- stage 1 cannot call a student attention module on its own (its weights are shards outside the root forward), so
  the student runs its full forward with each converted attention module fed the teacher's inputs;
- checkpoints are consolidated: the trained weights and a full (name-keyed) optimizer state are gathered to rank 0
  and written in the single-process file layout; resuming scatters them back. Exact, and independent of the
  number of processes except for the per-rank RNG files;
- the final model is rebuilt unsharded on rank 0 from the pretrained weights plus the trained ones.

On a CPU-only machine accelerate routes every launch to MULTI_CPU and refuses `--use_fsdp`; torch's `fully_shard`
runs on gloo there, so `fsdp_accelerator` switches the accelerator's state to FSDP itself: a `torchrun` launch with
the same FSDP_* variables then drives the same sharding code as a GPU launch (that is how the tests run it).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dijiang import settings


def fsdp_requested() -> bool:
    """True under `accelerate launch` with an FSDP config (or with ACCELERATE_USE_FSDP=true set by hand)."""
    return settings.accelerate_use_fsdp()


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type.name == "FSDP"


def fsdp_accelerator(mixed_precision: str):
    """An Accelerator in FSDP2 mode, its plugin read from the FSDP_* environment (what `accelerate launch` sets)."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError("dijiang train supports FSDP version 2 only (fsdp_version: 2 in the accelerate config)")
    if torch.cuda.is_available():
        return Accelerator(mixed_precision=mixed_precision, fsdp_plugin=plugin)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True)
    if accelerator.num_processes < 2:
        raise ValueError("FSDP on CPU needs at least 2 processes (torchrun --nproc_per_node N)")
    # accelerate only selects FSDP for accelerator devices; its FSDP2 code paths themselves run on gloo. Both
    # singletons: every AcceleratorState() (an AcceleratedOptimizer makes one) copies PartialState's type over
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    return accelerator


# ---------------------------------------------------------------- sharding


def shard(model, accelerator, extra_unit_classes=()):
    """`fully_shard` through accelerate: one unit per decoder layer (the model's `_no_split_modules`) and per
    module of `extra_unit_classes`, plus accelerate's embedding / head / root units."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    present = {type(module).__name__ for module in model.modules()}
    names = list(getattr(model, "_no_split_modules", None) or []) + [cls.__name__ for cls in extra_unit_classes]
    plugin = accelerator.state.fsdp_plugin
    # set per model: accelerate resolves the class names against the model it wraps, and the teacher has no
    # DiJiang modules; the attention modules must be units of their own for stage 1 (see attention_transfer_step)
    plugin.transformer_cls_names_to_wrap = [name for name in dict.fromkeys(names) if name in present]
    plugin.auto_wrap_policy = transformer_auto_wrap_policy
    return fsdp2_prepare_model(accelerator, model)


# ---------------------------------------------------------------- stage 1


def attention_outputs_on_inputs(student, input_ids: torch.Tensor, modules: list, module_inputs: list) -> list:
    """Run the sharded student's root forward with each of `modules` (its converted attention modules) fed the
    matching (args, kwargs) of `module_inputs` (its teacher module's inputs); return those modules' outputs.
    The rest of the forward is work FSDP needs: parameters are gathered only inside the root forward, and each
    attention module is a unit of its own, so that the backward from its output re-gathers its weights."""
    outputs, handles = [None] * len(modules), []
    for index, (module, inputs) in enumerate(zip(modules, module_inputs)):

        def use_given_inputs(_module, _args, _kwargs, inputs=inputs):
            return inputs

        def keep_output(_module, _args, output, index=index):
            outputs[index] = output[0] if isinstance(output, tuple) else output

        # prepend: run before FSDP's own pre-forward hook, which then casts these inputs like any others
        handles += [module.register_forward_pre_hook(use_given_inputs, with_kwargs=True, prepend=True),
                    module.register_forward_hook(keep_output)]
    try:
        student(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@contextmanager
def gathered(modules):
    """Inside the block, the parameters of those `modules` that are FSDP units are whole (for reading them outside
    a forward, on every rank); a no-op for unsharded modules."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in modules if isinstance(module, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


# ---------------------------------------------------------------- checkpoints


def full_trainable_state(model, names: list[str], accelerator) -> dict[str, torch.Tensor]:
    """The trained parameters gathered whole; rank 0 gets them on CPU, the other ranks an empty dict.
    Every rank must call this (each `full_tensor` is a collective), with the names in the same order."""
    from torch.distributed.tensor import DTensor

    parameters = dict(model.named_parameters())
    state = {}
    for name in names:
        parameter = parameters[name].detach()
        full = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
        if accelerator.is_main_process:
            state[name] = full.cpu().contiguous().clone()
    return state


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer state keyed by parameter name, gathered whole on rank 0 (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, _unwrapped(optimizer), options=options)


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """Scatter a name-keyed full optimizer state (every rank passes the whole of it) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _unwrapped(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _unwrapped(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tied_embeddings: bool

    def parameters(self) -> int:
        """Parameters of a Llama-family decoder (no biases): embeddings, attention, gated MLP, norms, head."""
        head_dim = self.hidden // self.heads
        attention = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o + k, v
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attention + mlp + 2 * self.hidden  # two RMSNorms
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embeddings + self.hidden  # + final norm


LLAMA_3_2_1B = ModelShape(hidden=2048, intermediate=8192, layers=16, vocab=128256, heads=32, kv_heads=8,
                          tied_embeddings=True)

GIB = 2**30


def fsdp_memory_per_gpu(shape: ModelShape, gpus: int, batch: int, seq: int, lora_fraction: float | None = None,
                        new_parameters: int = 0) -> dict[str, float]:
    """GiB per GPU for stage 2 of `dijiang train` under full-shard FSDP2 with bf16 compute (an estimate: the sharded
    states are exact, activations a rule of thumb; allocator fragmentation and CUDA context not counted).

    Sharded over `gpus`: the student in fp32 (4 B/param), its fp32 gradients and AdamW's two fp32 moments
    (4 + 8 B per trained param), the frozen teacher in fp32 (4 B/param: loaded like the student).
    Not sharded: the bf16 copies of the units being computed, for each of student and teacher two decoder layers
    (the current one and the prefetched one) and the head unit accelerate keeps gathered (embedding / head,
    2 B/param); the student's activations saved for backward, 34 x hidden bytes per token and layer in 16 bit
    (Korthikanti et al. 2022, without the 5 x heads x seq term of softmax scores: DiJiang attention keeps none);
    and five fp32 batch x seq x vocab tensors around the KL: student and teacher logits, their two
    log-softmaxes, the gradient of the student's logits.
    `lora_fraction`: the trained share of the student's parameters (None: full fine-tuning).
    """
    params = shape.parameters() + new_parameters
    trained = params if lora_fraction is None else params * lora_fraction + new_parameters
    head_params = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
    layer_params = (params - head_params) / shape.layers
    tokens = batch * seq
    parts = {
        "student_weights": 4 * params / gpus,
        "gradients": 4 * trained / gpus,
        "adam_moments": 8 * trained / gpus,
        "teacher_weights": 4 * shape.parameters() / gpus,
        "gathered_units": 2 * (2 * 2 * layer_params + 2 * head_params),  # bf16: 2 layers + head, x student/teacher
        "activations": 34 * shape.hidden * tokens * shape.layers,
        "logits": 5 * tokens * shape.vocab * 4,
    }
    gib = {name: value / GIB for name, value in parts.items()}
    gib["total"] = sum(gib.values())
    return gib


def memory_table(shape: ModelShape = LLAMA_3_2_1B, gpus_list=(1, 2, 4, 8), batch: int = 8, seq: int = 512) -> str:
    """A markdown table of `fsdp_memory_per_gpu` (the README's table is this function's output)."""
    rows = [fsdp_memory_per_gpu(shape, gpus, batch, seq) for gpus in gpus_list]
    names = list(rows[0])
    lines = ["| GiB per GPU | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in gpus_list) + " |",
             "|---|" + "---|" * len(gpus_list)]
    for name in names:
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(f"{row[name]:.1f}" for row in rows) + " |")
    return "\n".join(lines)
