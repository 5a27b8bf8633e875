"""The memory model of ``flowgrove memory``: peak bytes per GPU of a training run, predicted before anything loads.

Pure arithmetic over named records (no I/O, no torch): :class:`ModelSizes` (what a family's shipped configs count
and what one forward measured on the CPU, :mod:`flowgrove.bench.memory_sizes`), :class:`MemoryPlan` (the run's
settings that change memory) -> :class:`MemoryEstimate` (line items in bytes and the peak).

The run has two phases, and the peak is the larger:

- **rollout** (inference): the resident weights, optimizer state, EMA / KL-reference copies, text encoders (unless
  offloaded) and reward models, plus the VAE decode of ``decode_batch`` samples;
- **training**: the same resident bytes, plus the larger of the saved activations of one training forward
  (``micro_batch`` transitions, doubled under classifier-free guidance whose unconditional branch keeps its graph;
  with checkpointing, the blocks' inputs and the one block backward recomputes; a full fine-tune outside FSDP2
  adds autocast's compute-dtype copy of the weights) and the gradients (they grow as backward frees the
  activations; ``zero_grad(set_to_none)`` drops them before the next forward), plus backward's transient activation
  gradients (:data:`BACKWARD_TRANSIENT` of the largest block's saved activations) and under FSDP2 the all-gathered
  blocks.

Bytes per parameter: frozen weights in the policy dtype (bf16: 2) or quantised (int8 / float8: 1, nf4: 0.5 plus one
float32 absmax per 64 weights), only the ``nn.Linear`` weights being quantised; trainable weights float32 masters
(4) with float32 gradients (4) and AdamW's two moments (8; 8-bit AdamW: 2). A two-expert model (Wan 2.2 A14B)
trains one expert with the other frozen whole in the policy dtype, or (``expert=both``) both, each with its own
adapters and optimizer state. Edit models append the input image's latent tokens to the output's, so their
sequence (activations, attention) is longer at equal size. Not modeled: allocator fragmentation,
the CUDA context and NCCL buffers (about 1-3 GiB together) and the rollout's transient activations (inference
mode keeps none). LoRA's activations are measured with the default targets (``to_q``, ``to_k``, ``to_v``,
``to_out.0``); other targets change them a little, and only their parameter count is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANT_BYTES = {"int8": 1.0, "float8": 1.0, "nf4": 0.5 + 4 / 64}  # per quantised Linear weight, scales included
ADAM_BYTES = {"adamw": 8.0, "adamw8bit": 2.0}  # two moments per trainable parameter
MASTER_BYTES = 4  # float32 trainable weights, and their float32 gradients
ACT_DTYPE_BYTES = 2  # the activation fits are measured in bfloat16
# backward's activation gradients inside one block, as a fraction of that block's saved activations: the peaks
# measured on the CPU for tiny FLUX / SD3 / Wan / Qwen-Image models (tests/bench/test_memory.py) lay 0 to 2/3 of a
# block above the saved activations (higher under LoRA, whose float32 adapters take float32 gradients)
BACKWARD_TRANSIENT = 0.5


@dataclass(frozen=True)
class Line:
    """Bytes of one block (or of everything outside the blocks) as a function of tokens: ``a + b * tokens``."""

    a: float
    b: float

    def __call__(self, tokens: float) -> float:
        return self.a + self.b * tokens


@dataclass(frozen=True)
class UnitSizes:
    """One block FSDP2 shards on its own (an element of a top-level ``nn.ModuleList``)."""

    group: str  # the ModuleList's name: transformer_blocks, single_transformer_blocks, blocks, down_blocks ...
    params: int
    saved: Line  # bytes autograd keeps for backward in one sample's forward of this block (bf16 autocast)
    saved_lora: Line  # the same with the weights frozen and a LoRA on the default targets
    inputs: Line  # bytes of its hidden-state inputs: what a checkpointed block keeps (bf16)


@dataclass(frozen=True)
class ModelSizes:
    """A family's trainable model as counted on the meta device and measured on the CPU, and its other parts."""

    name: str
    params: int  # the whole transformer (or UNet)
    linear_weights: int  # of which nn.Linear weights (what policy.quantize stores in 8 or 4 bits)
    units: tuple[UnitSizes, ...]
    outside: Line  # activations saved outside the blocks (embedders, final layer), per sample
    outside_lora: Line  # the same under LoRA
    lora_dims: dict[str, int]  # LoRA target name (a module-name suffix) -> sum of in + out features it matches
    text_encoder_params: int
    vae_params: int
    decode: Line  # peak bytes of one image's (one frame's) VAE decode in bf16 by its pixels (height x width)
    patch: int  # latent pixels per token side (VAE scale x patch size): tokens = (H / patch) * (W / patch)
    frames_per_token: int  # video: 4 frames per latent frame (1 + (F - 1) / 4 latent frames); images: 0
    joint_text: bool  # text tokens run through the blocks with the image's (MM-DiT), not only cross-attended
    image_tokens: int = 0  # edit models: input images whose latent tokens follow the output's in the sequence
    experts: int = 1  # copies of the transformer in the folder (Wan 2.2 A14B: transformer and transformer_2)

    def tokens(self, height: int, width: int, frames: int, text: int, input_pixels: int = 0) -> int:
        """Tokens of one sample through the blocks: latent patches (x latent frames for videos), those of
        ``image_tokens`` input images (each ``input_pixels`` in area; 0: the output's size) and joint text."""
        latent_frames = 1 + (frames - 1) // self.frames_per_token if self.frames_per_token else 1
        output = latent_frames * (height // self.patch) * (width // self.patch)
        inputs = self.image_tokens * (input_pixels // self.patch**2 if input_pixels else output)
        return output + inputs + (text if self.joint_text else 0)


@dataclass(frozen=True)
class MemoryPlan:
    """The settings of a run that change its memory per GPU (from a config: ``recipes/memory.plan_of``)."""

    gpus: int = 1
    dtype: str = "bfloat16"  # policy.dtype: frozen weights and compute
    lora_rank: int = 0  # 0: full fine-tune
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    quantize: str = "none"  # policy.quantize: none | int8 | float8 | nf4 (frozen base under LoRA)
    optimizer: str = "adamw"  # train.optimizer: adamw | adamw8bit
    offload: str = "none"  # run.offload: none | optimizer | params
    parallel: str = "ddp"  # ddp (each GPU holds everything) or fsdp (FSDP2: sharded per block)
    checkpointing: bool = False
    micro_batch: int = 1  # transitions per training forward
    cfg_graph: bool = False  # the training forward runs a CFG unconditional branch that keeps its graph
    height: int = 1024
    width: int = 1024
    frames: int = 1
    text_tokens: int = 512
    input_pixels: int = 0  # edit models: the input image's pixel area (0: the output's; qwen_image_edit's image_area)
    expert: str = "high"  # two-expert models (policy.options.expert): high | low trains one, both trains both
    decode_batch: int = 1
    ema: bool = False  # a float32 EMA copy of the trainable weights
    reference: bool = False  # a float32 KL-reference copy of the trainable weights
    text_encoders: bool = False  # kept on the GPU (policy.offload_text_encoders=false)
    reward_params: int = 0  # reward models on the GPU (float32)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes per GPU by line item, the two phases' peaks and the run's peak."""

    items: dict[str, float] = field(default_factory=dict)
    rollout: float = 0.0
    training: float = 0.0

    @property
    def peak(self) -> float:
        return max(self.rollout, self.training)

    def gib(self) -> dict[str, float]:
        """Every line item and the peaks in GiB."""
        return {**{k: v / GIB for k, v in self.items.items()}, "rollout peak": self.rollout / GIB,
                "training peak": self.training / GIB, "peak": self.peak / GIB}


def lora_params(sizes: ModelSizes, targets: tuple[str, ...], rank: int) -> int:
    """LoRA parameters: ``rank * (in + out)`` of every Linear a target names (peft: the name or a ``.``-suffix)."""
    return rank * sum(sizes.lora_dims.get(t, 0) for t in targets)


def trained_experts(sizes: ModelSizes, plan: MemoryPlan) -> int:
    """Copies of the transformer that train: both experts of a two-expert model under ``expert=both``, else one."""
    return sizes.experts if plan.expert == "both" else 1


def trainable_params(sizes: ModelSizes, plan: MemoryPlan) -> int:
    """The parameters AdamW trains: the LoRA adapters, or the whole model, of each trained expert."""
    one = lora_params(sizes, plan.lora_targets, plan.lora_rank) if plan.lora_rank else sizes.params
    return one * trained_experts(sizes, plan)


def frozen_weight_bytes(sizes: ModelSizes, plan: MemoryPlan) -> float:
    """The frozen weights: under LoRA the trained experts' base and an untrained second expert whole, each with its
    Linear weights quantised by ``policy.quantize`` and the rest in the policy dtype (``policy.quantize`` needs LoRA);
    without LoRA the untrained expert in the policy dtype."""
    dtype = DTYPE_BYTES[plan.dtype]
    idle = sizes.experts - trained_experts(sizes, plan)
    if not plan.lora_rank:
        return idle * sizes.params * dtype
    if plan.quantize == "none":
        return sizes.experts * sizes.params * dtype
    base = sizes.linear_weights * QUANT_BYTES[plan.quantize] + (sizes.params - sizes.linear_weights) * dtype
    return sizes.experts * base


def shard(plan: MemoryPlan) -> int:
    """How many GPUs share the trainable state: all of them under FSDP2, none under DDP."""
    return plan.gpus if plan.parallel == "fsdp" else 1


def state_bytes(sizes: ModelSizes, plan: MemoryPlan) -> dict[str, float]:
    """Resident bytes per GPU of the weights, the optimizer state and the EMA / KL-reference copies."""
    trained = trainable_params(sizes, plan)
    on_gpu = 0.0 if plan.offload == "params" else 1.0
    optimizer_on_gpu = 0.0 if plan.offload in ("optimizer", "params") else 1.0
    frozen = frozen_weight_bytes(sizes, plan)
    per_gpu = trained * MASTER_BYTES / shard(plan)
    copies = (int(plan.ema) + int(plan.reference)) * per_gpu
    return {"frozen weights": frozen, "trainable weights (float32)": per_gpu * on_gpu,
            "optimizer state": trained * ADAM_BYTES[plan.optimizer] / shard(plan) * optimizer_on_gpu,
            "EMA / KL reference copies": copies}


def gradient_bytes(sizes: ModelSizes, plan: MemoryPlan) -> float:
    """float32 gradients per GPU of the trainable parameters (sharded under FSDP2, on the CPU with params offload)."""
    if plan.offload == "params":
        return 0.0
    return trainable_params(sizes, plan) * MASTER_BYTES / shard(plan)


def fsdp_buffer_bytes(sizes: ModelSizes, plan: MemoryPlan) -> float:
    """FSDP2 of a full fine-tune: the all-gathered blocks in the compute dtype (current + prefetched next = 2 of the
    largest) and the float32 unsharded gradient of one block before its reduce-scatter."""
    if plan.parallel != "fsdp" or plan.lora_rank:
        return 0.0
    largest = max(u.params for u in sizes.units)
    return 2 * largest * DTYPE_BYTES[plan.dtype] + largest * MASTER_BYTES


def rows_scale(sizes: ModelSizes, plan: MemoryPlan) -> float:
    """Samples through one training forward (x2 for a CFG branch's graph; +1 when both experts train: the expert
    that got no row of the micro-batch runs one at weight 0, ``WanPolicy._expert_velocity``) times the compute
    dtype's size over the measured bfloat16's."""
    idle_row = 1 if trained_experts(sizes, plan) > 1 else 0
    return (plan.micro_batch * (2 if plan.cfg_graph else 1) + idle_row) * DTYPE_BYTES[plan.dtype] / ACT_DTYPE_BYTES


def plan_tokens(sizes: ModelSizes, plan: MemoryPlan) -> int:
    """Tokens of one sample through the blocks under ``plan``'s sizes."""
    return sizes.tokens(plan.height, plan.width, plan.frames, plan.text_tokens, plan.input_pixels)


def saved_line(unit: UnitSizes, plan: MemoryPlan) -> Line:
    """What one block saves: measured with every weight trained, or with a LoRA over frozen weights."""
    return unit.saved_lora if plan.lora_rank else unit.saved


def one_block_bytes(sizes: ModelSizes, plan: MemoryPlan) -> float:
    """Saved activations of the largest block for the forward's rows (what backward holds of a recomputed block)."""
    n = plan_tokens(sizes, plan)
    return rows_scale(sizes, plan) * max(saved_line(u, plan)(n) for u in sizes.units)


def activation_bytes(sizes: ModelSizes, plan: MemoryPlan) -> float:
    """Saved activations of one training forward: every block's (or, checkpointed, every block's inputs plus the one
    block recomputed in backward) and the outside's, for the forward's rows; a full fine-tune outside FSDP2 adds
    autocast's compute-dtype copy of every weight (FSDP2 gathers the blocks in that dtype instead)."""
    n, rows = plan_tokens(sizes, plan), rows_scale(sizes, plan)
    outside = rows * (sizes.outside_lora if plan.lora_rank else sizes.outside)(n)
    casts = 0.0
    if not plan.lora_rank and plan.parallel != "fsdp" and plan.dtype != "float32":
        casts = trained_experts(sizes, plan) * sizes.params * DTYPE_BYTES[plan.dtype]
    if plan.checkpointing:
        blocks = rows * sum(u.inputs(n) for u in sizes.units) + one_block_bytes(sizes, plan)
    else:
        blocks = rows * sum(saved_line(u, plan)(n) for u in sizes.units)
    return blocks + outside + casts


def decode_bytes(sizes: ModelSizes, plan: MemoryPlan) -> float:
    """Peak of the VAE decode of ``decode_batch`` samples (the VAE's weights included). The video VAEs decode a
    latent frame at a time (Wan's causal cache, HunyuanVideo's tiles), so a video costs one frame's decode plus
    its output frames (3 channels in the compute dtype)."""
    frame = plan.height * plan.width
    video = (plan.frames - 1) * frame * 3 * DTYPE_BYTES[plan.dtype]
    return plan.decode_batch * (sizes.decode(frame) + video) + sizes.vae_params * DTYPE_BYTES[plan.dtype]


def predict(sizes: ModelSizes, plan: MemoryPlan) -> MemoryEstimate:
    """Bytes per GPU of ``plan`` on the model ``sizes``: line items, the rollout's and the training's peak."""
    items = state_bytes(sizes, plan)
    items["text encoders"] = sizes.text_encoder_params * DTYPE_BYTES[plan.dtype] if plan.text_encoders else 0.0
    items["reward models"] = plan.reward_params * 4.0
    resident = sum(items.values())
    items["VAE decode"] = decode_bytes(sizes, plan)
    items["gradients"] = gradient_bytes(sizes, plan)
    items["activations"] = activation_bytes(sizes, plan)
    items["FSDP2 unsharded blocks"] = fsdp_buffer_bytes(sizes, plan)
    items["backward transient"] = BACKWARD_TRANSIENT * one_block_bytes(sizes, plan)
    training = (resident + max(items["activations"], items["gradients"]) + items["backward transient"]
                + items["FSDP2 unsharded blocks"])
    return MemoryEstimate(items, rollout=resident + items["VAE decode"], training=training)
