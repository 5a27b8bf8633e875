"""The configuration schema: one dataclass per section, each field with its help text, choices and lower bound.

Pure data (no I/O); the choices of a kind come from the table of the code that picks by it: :mod:`flowgrove.config.load` merges presets, files and overrides over these defaults and
:mod:`flowgrove.config.checks` validates what a single field's metadata cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flowgrove.grpo.losses import EMA_SCHEDULES, RATIO_NORMS, STEP_WEIGHTS, TRUST_REGIONS
from flowgrove.grpo.matching import OBJECTIVES
from flowgrove.grpo.plans import STRATEGIES, TAILS
from flowgrove.grpo.tree import FUSION_MODES
from flowgrove.grpo.tree_rules import TREE_ADVANTAGES
from flowgrove.policies.quantize import QUANTIZE_KINDS
from flowgrove.samplers.schedules import TAIL_SPACINGS
from flowgrove.samplers.steps import NOISE_LEVELS
from flowgrove.tasks.catalog import DEFAULT_TASK, TASKS


OPTIMIZERS = ("adamw", "adamw8bit")  # what training.parts.OPTIMIZERS builds


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, low: float | None = None) -> Any:
    meta = {"help": help, "choices": choices, "low": low}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PolicyConfig:
    name: str = _f("digits", "Registered policy adapter: digits, numbers (built-in tiny FLUX), flux1, flux_kontext, flux2, sd3, wan, qwen_image, qwen_image_edit, sd15, sdxl, hunyuan_video, z_image (local diffusers folders).")
    path: str = _f("", "Weights: a safetensors file (digits, numbers) or a local diffusers folder (other policies); empty = the shipped weights.")
    lora_rank: int = _f(0, "LoRA rank through peft; 0 trains the full transformer.", low=0)
    lora_alpha: float = _f(0.0, "LoRA alpha; 0 means 2 * rank (the references' ratio).", low=0)
    lora_targets: list = _f(["to_q", "to_k", "to_v", "to_out.0"], "Module names that get LoRA adapters.")
    dtype: str = _f("float32", "Compute dtype: float32, or bfloat16/float16 autocast; trainable weights and Adam stay float32, frozen weights may be bf16.", ("float32", "bfloat16", "float16"))
    options: dict = _f({}, "Adapter settings passed to the policy factory (e.g. height, width, guidance / guidance_scale, max_sequence_length).")
    offload_text_encoders: bool = _f(False, "Move the text encoders to the CPU once the prompts are encoded.")
    quantize: str = _f("none", "LoRA only: the frozen base's linear weights in its transformer blocks stored in int8 or float8 (torchao, weight-only) or nf4 (bitsandbytes' 4-bit NormalFloat); the adapters stay float32 masters, and export writes the LoRA for the unquantised base.", QUANTIZE_KINDS)


@dataclass
class SamplerConfig:
    num_steps: int = _f(16, "Denoising steps of a training rollout (T).", low=1)
    shift: float = _f(3.0, "Time shift of the sigma grid (SD3/FLUX); 1 disables it.", low=0)
    schedule: str = _f("flux", "Sigma grid: flux (shifted linspace) or sd3 (diffusers, shift applied twice).", ("flux", "sd3"))
    noise: str = _f("constant", "SDE noise: constant g = level (DanceGRPO), flow g = level*sqrt(s/(1-s)) (Flow-GRPO), or cps: the coefficient-preserving step with std = sin(level*pi/2)*s_next (Flow-GRPO sde_type=cps).", tuple(NOISE_LEVELS))
    noise_level: float = _f(0.3, "eta (constant), a (flow) or eta in [0, 1] (cps).", low=0)
    reward_image: str = _f("x0_pred", "Image scored: x0_pred of the last step (its transition is not trained) or final.", ("x0_pred", "final"))
    chunk_size: int = _f(0, "Largest batch of one model call in rollouts and evaluation; 0 = no limit.", low=0)


@dataclass
class WindowConfig:
    enabled: bool = _f(False, "MixGRPO: SDE only inside a sliding window of steps, Euler ODE elsewhere.")
    size: int = _f(4, "Window size w (SDE and trained steps).", low=1)
    interval: int = _f(25, "Shift interval tau: iterations between window moves.", low=1)
    stride: int = _f(1, "Steps the window moves each time; 0 freezes it.", low=0)
    strategy: str = _f("progressive", "Window schedule.", STRATEGIES)
    roll_back: bool = _f(True, "Return to the start after the last position.")
    start: int = _f(0, "Initial window start.", low=0)
    min_interval: int = _f(1, "linear_decay: shortest interval.", low=1)
    max_interval: int = _f(10, "linear_decay: longest interval.", low=1)
    exp_k: float = _f(0.1, "exp_decay: decay rate k.", low=0)
    exp_threshold: int = _f(13, "exp_decay: window start after which the interval decays.", low=0)
    tail: str = _f("euler", "ODE steps after the window: euler, or dpm (DPM-Solver++ 2M, compressed: Flash).", TAILS)
    compress_ratio: float = _f(0.4, "dpm tail: kept fraction of the post-window steps (>= 2 grid points).", low=0)
    tail_spacing: str = _f("logsnr", "dpm tail: where its points lie: logsnr (uniform in log-SNR down to the grid's last nonzero sigma, so the reward image is not a model prediction at a mid noise level) or shifted (MixGRPO's time-shifted linspace; reference parity).", tuple(TAIL_SPACINGS))


@dataclass
class TreeConfig:
    enabled: bool = _f(False, "BranchGRPO: tree rollouts that share prefixes and split at chosen steps.")
    split_steps: list = _f([], "Steps at which every node splits; empty = split_rounds evenly spaced splits.")
    split_rounds: int = _f(4, "Number of evenly spaced splits when split_steps is empty.", low=0)
    branching: int = _f(2, "Children per split (K).", low=2)
    split_noise_scale: float = _f(4.0, "Noise multiplier of split steps; the log-prob uses this std.", low=0)
    same_noise: bool = _f(True, "All trees start from the same initial noise.")
    fusion: str = _f("mean", "Leaf reward fusion: mean, path (path-probability softmax) or local (reference).", FUSION_MODES)
    temperature: float = _f(1.0, "Temperature of the path/local fusion softmax.", low=0)
    depth_pruning: list = _f([], "Child depths excluded from the backward pass.")
    depth_slide_interval: int = _f(0, "Iterations per one-depth slide of the pruned band towards the root; 0 = static.", low=0)
    depth_stop: int = _f(-1, "Shallowest depth the sliding band may reach; -1 = the last split step.")
    width_keep: int = _f(0, "Width pruning: leaves per tree whose post-split chains are trained (best and worst); 0 = off.", low=0)
    pruning_fraction: float = _f(1.0, "Fraction of training during which pruning is active.", low=0)
    mix: bool = _f(False, "Mix variant: SDE only at split steps and inside the window (window.*), ODE elsewhere.")
    adaptive_calls: int = _f(0, "Adaptive trees: model calls per tree (prompt); at each split step the same fraction of a tree's nodes splits, the best and worst by the trained reward of their x0 prediction, the rest go on as chains (docs/trees.md); 0 = off (every node splits).", low=0)
    split_logprob_std: str = _f("drawn", "Std of a split child's log-prob: drawn (the std it was sampled with) or reference (BranchGRPO: unscaled).", ("drawn", "reference"))


@dataclass
class RolloutConfig:
    prompts_per_step: int = _f(4, "Prompts per training step, over all ranks (a group may span ranks; a tree may not).", low=1)
    group_size: int = _f(8, "Images per prompt (chains); trees use their leaves.", low=1)
    same_noise_in_group: bool = _f(True, "A group starts from one shared initial noise (DanceGRPO, MixGRPO).")
    decode_batch: int = _f(0, "Largest batch of one decoder (VAE) call; 0 = no limit.", low=0)
    scouts: int = _f(1, "Scout rollouts (Sol-RL's idea): with S > 1 every chain draws S candidate initial noises, a cheap Euler ODE pass of rollout.scout_steps scores them with the trained rewards, and each group rolls out in full its group_size // 2 best and the rest worst candidates; 1 = off.", low=1)
    scout_steps: int = _f(4, "Euler ODE steps of the scout pass (rollout.scouts > 1), on the sampler's schedule.", low=1)


@dataclass
class DataConfig:
    train: str = _f("", "Training prompts: a .txt (one per line), .jsonl or .csv (a prompt column; other columns are metadata for the rewards, an image column an edit model's input image relative to the file); empty = the policy's built-in prompts.")
    test: str = _f("", "Held-out prompts of the evaluation (same formats); empty = the policy's held-out prompts (numbers: the 20 test numbers), else the training prompts (with the evaluation's own seeds).")
    cache: str = _f("", "A `flowgrove encode-prompts` folder of the training prompts: steps read only their rows from it.")


@dataclass
class AdvantageConfig:
    kind: str = _f("group", "group z-score, group_global_std (per-prompt mean, global std), depthwise (trees: BranchGRPO's z-scores of fused rewards per depth) or backprop (trees: TreeGRPO's leaf z-scores backed up as subtree means).", ("group", "group_global_std", *TREE_ADVANTAGES))
    ddof: int = _f(1, "Delta degrees of freedom of the std.", low=0)
    eps: float = _f(1e-8, "Added to the std.", low=0)
    clip: float = _f(5.0, "Advantages are clamped to +-clip.", low=0)
    aggregate: str = _f("reward", "Several rewards: weighted raw sum (reward) or weighted sum of per-reward advantages (advantage).", ("reward", "advantage"))


@dataclass
class TrainConfig:
    steps: int = _f(100, "Training iterations (rollout + update).", low=0)
    lr: float = _f(1e-4, "AdamW learning rate.", low=0)
    weight_decay: float = _f(1e-4, "AdamW weight decay.", low=0)
    betas: list = _f([0.9, 0.999], "AdamW betas.")
    adam_eps: float = _f(1e-8, "AdamW eps.", low=0)
    clip_range: float = _f(1e-3, "PPO clip range of the importance ratio.", low=0)
    kl_beta: float = _f(0.0, "Weight of the exact Gaussian KL to the initial policy (0 = off).", low=0)
    tail_anchor: float = _f(0.0, "Windows and trees: weight of the mean squared output difference to the initial policy at the final samples noised to the noise levels of the plan's untrained steps (one row per sample), which holds the network where no log-prob credits its changes (docs/collapse.md, section 4; 0 = off).", low=0)
    timesteps: str = _f("random_fraction", "Trained steps (forward objectives: grid times): random_fraction per sample, first_k in order, or plan (window/tree).", ("random_fraction", "first_k", "plan"))
    timestep_fraction: float = _f(0.6, "random_fraction: share of the eligible steps trained per sample.", low=0)
    first_k: int = _f(0, "first_k: number of leading steps trained.", low=0)
    exclude_last_step: bool = _f(False, "Never train the last step, also when the reward scores the final sample (DanceGRPO's SD recipe trains timesteps[:-1]); with sampler.reward_image=x0_pred it is never trained anyway.")
    accumulate: str = _f("samples", "An optimizer step per accumulate_size samples, or per accumulate_size transitions.", ("samples", "transitions"))
    accumulate_size: int = _f(8, "Samples (or transitions) per optimizer step.", low=1)
    micro_batch: int = _f(64, "Transitions per training forward pass.", low=1)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", low=0)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (the diffusers transformer's own switch).")
    ema_decay: float = _f(0.0, "EMA of the trainable weights (0 = off); used for the final evaluation and export.", low=0)
    seed: int = _f(0, "Seed of every generator in the run.")
    max_nonfinite_skips: int = _f(3, "Consecutive optimizer steps skipped for a NaN/inf loss or gradient norm before the run stops with a checkpoint.", low=1)
    kl_scale: str = _f("exact", "KL term: exact transition KL, or reference (Flow-GRPO: ||dmu||^2 / 2g^2 = exact KL * dsigma; flow policies only).", ("exact", "reference"))
    loss_scale: str = _f("mean", "Loss per optimizer step: mean over its transitions, or reference (BranchGRPO: sum / (G * edges per tree)).", ("mean", "reference"))
    drop_zero_advantage: bool = _f(False, "Leave transitions whose advantage is exactly 0 (a group whose rewards all tie) out of the loss: no gradient, no KL, not counted in the mean (Flow-GRPO's filter); each rank drops its own.")
    ema_schedule: str = _f("update", "EMA: every optimizer step (update), once per rollout (dancegrpo), or Flow-GRPO's min((1+s)/(10+s), decay) every 8 steps (flowgrpo).", tuple(EMA_SCHEDULES))
    ratio_norm: str = _f("none", "Importance ratio: none (exp of the log-prob difference) or grpo_guard (GRPO-Guard's RatioNorm: the log-ratio plus the exact KL to the rollout step, times the transition std: centred on 1, one scale at every step).", tuple(RATIO_NORMS))
    step_weight: str = _f("none", "Per-step weight of the policy loss: none, grpo_guard (GRPO-Guard: 1 / (sigma - sigma_next)) or tempflow (TempFlow-GRPO: the step's transition std over its mean on the trainable steps).", tuple(STEP_WEIGHTS))
    trust_region: str = _f("clip", "clip (PPO's ratio clip, train.clip_range) or dppo (Flow-DPPO: no clip; a transition whose exact KL to the rollout step reaches train.trust_region_kl while the update pushes it further gets no gradient).", tuple(TRUST_REGIONS))
    trust_region_kl: float = _f(1e-5, "dppo: bound on the exact per-dimension Gaussian KL between the current and the rollout policy's step.", low=0)
    updates_per_rollout: int = _f(1, "Passes over the rollout's stored transitions (TreeGRPO, PPO-style reuse): each pass reshuffles them into the same accumulation groups; the rollout's log-probs stay the old log-probs, so later passes move the ratio and the clip bounds it.", low=1)
    objective: str = _f("grpo", "What the update trains: grpo (PPO-clip on the stored SDE transitions' log-probs), or a forward-process objective on the rollout's final samples noised at train.timesteps' grid times, without log-probs (any sampler, sampler.noise_level=0 for ODE rollouts): nft (DiffusionNFT) or awm (Advantage Weighted Matching).", OBJECTIVES)
    nft_beta: float = _f(1.0, "nft: beta of the implicit policies v+ = beta*v + (1-beta)*v_old, v- = (1+beta)*v_old - beta*v (DiffusionNFT: 1.0; 0.1 for OCR).", low=0)
    optimizer: str = _f("adamw", "adamw (torch's AdamW, float32 moments) or adamw8bit (torchao's AdamW8bit: both moments in 8 bits, blockwise scaled, for tensors of at least 4096 elements in whole blocks of 256; 2 bytes instead of 8 per parameter).", OPTIMIZERS)
    awm_power: float = _f(0.25, "awm: power p of the generalised-Huber weighting sigma * (mse^p) / p of the flow-matching error (AWM: 0.25; 1 = the sigma-weighted mean square).", low=0)


@dataclass
class EvalConfig:
    samples_per_prompt: int = _f(8, "Held-out images per prompt (fixed seeds, ODE sampling).", low=1)
    num_steps: int = _f(16, "Euler ODE steps of the held-out evaluation.", low=1)
    seed: int = _f(1234, "Seed of the held-out initial noise.")
    every: int = _f(10, "Also evaluate every N steps (0 = only before and after): rewards, judges, diversity, MMD^2 and KL to the base (docs/evaluation.md); the reward-hacking guard reads these evaluations.", low=0)
    judges: list = _f([], "Rewards scored at every evaluation but not trained on (e.g. [digit_classifier] when training boldness); options from reward_options.")
    hybrid_steps: int = _f(0, "Also evaluate hybrid inference: the policy for the first K of eval.num_steps steps, the base model after, reported under eval/hybrid/ (0 = off).", low=0)
    best: str = _f("judges", "Criterion of checkpoints/best: judges (mean judge, else the trained reward), reward (trained, weighted), combined (their mean) or off.", ("judges", "reward", "combined", "off"))


@dataclass
class GuardConfig:
    enabled: bool = _f(True, "Reward-hacking guard over the periodic evaluations (needs eval.every > 0).")
    window: int = _f(3, "Evaluations the guard looks back over.", low=1)
    judge_drop: float = _f(0.05, "Alarm when the trained reward rises while a judge falls by more than this over the window.", low=0)
    diversity_fraction: float = _f(0.5, "Alarm when diversity stays below this fraction of the base model's for the whole window.", low=0)
    action: str = _f("warn", "On an alarm: warn (log and print) or stop (checkpoint and exit).", ("warn", "stop"))


@dataclass
class RunConfig:
    out: str = _f("", "Run directory; empty = runs/<method>-<timestamp>.")
    checkpoint_every: int = _f(25, "Steps between checkpoints (and one at the end).", low=1)
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk.", low=1)
    progress: bool = _f(True, "Show a progress bar.")
    device: str = _f("auto", "auto (CUDA when present), cpu, cuda or cuda:N; under torchrun each rank uses cuda:LOCAL_RANK.")
    threads: int = _f(1, "torch CPU threads per process (0 = torch's default).", low=0)
    parallel: str = _f("auto", "Data parallelism under torchrun: ddp, fsdp (FSDP2, fully_shard per block), none, or auto (ddp for LoRA, fsdp for full fine-tunes).", ("auto", "none", "ddp", "fsdp"))
    offload: str = _f("none", "none, or params: FSDP2's CPUOffloadPolicy keeps the shards of the parameters, gradients and optimizer state on the CPU and copies each block in for its forward/backward (needs FSDP2: torchrun, run.parallel=auto or fsdp). optimizer (state only) is refused: torch's FSDP2 has no such variant.", ("none", "optimizer", "params"))
    collective_timeout: float = _f(600.0, "Seconds any collective may wait for the other ranks before the run stops naming the silent rank(s) (docs/scale-out.md).", low=1)


@dataclass
class Config:
    method: str = _f("dancegrpo", "Method preset (flowgrove methods lists them).")
    task: str = _f(DEFAULT_TASK, "Embedded task (flowgrove tasks lists them): sets policy, prompts, rewards and judges over the method preset; explicit keys still override.", tuple(TASKS))
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: dict = _f({"digit_classifier": 0.5, "boldness": 0.5},
                       "Reward name -> weight, used as given (a negative weight penalises that reward); replaces the preset's set.")
    reward_options: dict = _f({}, "Reward name -> factory options, e.g. {aesthetic: {head: PATH}, pickscore: {variant: flowgrpo, batch_size: 16}}.")
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    run: RunConfig = field(default_factory=RunConfig)


_SECTIONS = {c.__name__: c for c in (PolicyConfig, SamplerConfig, WindowConfig, TreeConfig, RolloutConfig, DataConfig, AdvantageConfig, TrainConfig, EvalConfig, GuardConfig, RunConfig)}
