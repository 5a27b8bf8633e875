"""Config checks beyond a single field's metadata, run by :func:`flowgrove.config.load.build_config` before any model
loads: list items, reward weights and names, cross-field combinations (window, tree, train), ``run.device``.

The few quantities of a config that both the checks and :mod:`flowgrove.training.method` need (trainable positions,
window positions, split steps) are defined here once.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from flowgrove.config.schema import Config
from flowgrove.grpo import tree, tree_rules
from flowgrove.messages import ConfigError, did_you_mean, one_line
from flowgrove.policies.quantize import check_quantize
from flowgrove.samplers.steps import noise_g, sde_type_of



def last_step_excluded(cfg: Config) -> bool:
    """The last transition is never trained: the reward image is its x0 prediction (so it is never sampled), CPS
    draws no noise onto sigma 0 (its std ``g * sigma_next`` is 0, so it has no log-prob), or
    ``train.exclude_last_step`` keeps it out with the final sample scored (DanceGRPO's SD recipe)."""
    return cfg.sampler.reward_image == "x0_pred" or sde_type_of(cfg.sampler.noise) == "cps" or cfg.train.exclude_last_step


def trainable_positions(cfg: Config) -> int:
    """Transitions that can be trained: all but the last one when :func:`last_step_excluded`."""
    return cfg.sampler.num_steps - last_step_excluded(cfg)


def window_positions(cfg: Config) -> int:
    """Steps a sliding SDE window may cover. With the final sample as the reward image the last two steps stay
    out of every window position, as in MixGRPO's reference (max_timesteps = T - 2): an SDE step there would leave
    its noise in the scored image. With the x0 prediction only the last (unsampled) transition is out."""
    return cfg.sampler.num_steps - (2 if cfg.sampler.reward_image == "final" else 1)


def split_steps(cfg: Config) -> tuple[int, ...]:
    t = cfg.tree
    if t.split_steps:
        return tree.parse_split_steps(t.split_steps, cfg.sampler.num_steps)
    return tree.split_steps_evenly(cfg.sampler.num_steps, t.split_rounds)


def check_method(cfg: Config) -> None:
    """Cross-field checks that a single field's metadata cannot express; :class:`ConfigError` naming the keys.

    ``build_config`` runs them, so a bad combination is reported before any model or weight is loaded.
    """
    for check in (_check_mode, _check_steps, _check_window, _check_tree, _check_train, _check_cps, _check_objective,
                  _check_scouts):
        check(cfg)


def _check_scouts(cfg: Config) -> None:
    """Scouts rank each chain's own initial noise: not a tree's one root, not a group's one shared noise."""
    s = cfg.rollout.scouts
    if s == 1:
        return
    if cfg.tree.enabled:
        raise ConfigError(f"rollout.scouts={s} ranks the initial noises of chains, but a tree (tree.enabled) grows from "
                          "one root noise; set rollout.scouts=1")
    if cfg.rollout.same_noise_in_group:
        raise ConfigError(f"rollout.scouts={s} ranks each chain's own initial noise, but rollout.same_noise_in_group=true "
                          "gives a group one shared noise; set rollout.same_noise_in_group=false (or rollout.scouts=1)")


def check_config(cfg: Config) -> None:
    """Every config-time check beyond the field metadata (``build_config`` runs it, before any model loads): list
    items, reward weights and names, the cross-field checks of :func:`check_method`, and ``run.device``."""
    for key, (kind, length) in _LIST_ITEMS.items():
        _check_list(cfg, key, kind, length)
    _check_rewards(cfg.rewards)
    check_method(cfg)
    _check_reward_names(cfg)
    check_device(cfg.run.device)
    _check_memory(cfg)


def _check_mode(cfg: Config) -> None:
    if cfg.tree.enabled and cfg.window.enabled and not cfg.tree.mix:
        raise ConfigError("window.enabled with tree.enabled needs tree.mix=true (BranchGRPO-Mix); or disable one of them")
    if cfg.tree.enabled and cfg.advantage.kind not in tree_rules.TREE_ADVANTAGES:
        raise ConfigError(f"tree rollouts need advantage.kind=depthwise or backprop, got {cfg.advantage.kind!r}")
    if not cfg.tree.enabled and cfg.advantage.kind in tree_rules.TREE_ADVANTAGES:
        raise ConfigError(f"advantage.kind={cfg.advantage.kind} needs tree.enabled=true; use group or group_global_std "
                          "for chains")
    if not cfg.tree.enabled and cfg.rollout.group_size < 2:
        raise ConfigError("rollout.group_size must be >= 2: GRPO normalises rewards within the images of one prompt")
    smallest, key = (cfg.tree.branching, "tree.branching") if cfg.tree.enabled else (cfg.rollout.group_size, "rollout.group_size")
    if cfg.advantage.ddof >= smallest:
        raise ConfigError(f"advantage.ddof={cfg.advantage.ddof} leaves no degrees of freedom in groups of {smallest} "
                          f"({key}); use advantage.ddof=0 or 1, or larger groups")


def _check_steps(cfg: Config) -> None:
    if trainable_positions(cfg) < 1:
        s = cfg.sampler
        why = (f"sampler.reward_image={s.reward_image}" if s.reward_image == "x0_pred" else
               f"sampler.noise={s.noise}" if sde_type_of(s.noise) == "cps" else "train.exclude_last_step=true")
        raise ConfigError(f"sampler.num_steps={s.num_steps} with {why} leaves no trainable step (the last "
                          "transition is never trained then); set sampler.num_steps>=2")


def _check_window(cfg: Config) -> None:
    """The window of MixGRPO (window.enabled) or of BranchGRPO-Mix (tree.mix) must fit the trainable steps."""
    w, last = cfg.window, window_positions(cfg)
    if not (cfg.window.enabled or (cfg.tree.enabled and cfg.tree.mix)):
        return
    tail_grid = cfg.window.enabled or cfg.window.tail == "dpm"  # plans laid on schedules.flux_sigmas
    if cfg.sampler.schedule == "sd3" and tail_grid:
        raise ConfigError("sampler.schedule=sd3 with a window or a compressed tail: those plans are laid on FLUX's "
                          "time-shifted grid (sampler.shift), not SD3's; set sampler.schedule=flux "
                          "or window.enabled=false")
    if w.size > last:
        raise ConfigError(f"window.size={w.size} exceeds the {last} steps a window may cover (sampler.num_steps="
                          f"{cfg.sampler.num_steps} minus the last step, minus two with sampler.reward_image=final; "
                          f"here reward_image={cfg.sampler.reward_image}); lower window.size")
    if w.start > last - w.size:
        raise ConfigError(f"window.start={w.start} is beyond the last window position {last - w.size} "
                          f"(= {last} steps a window may cover - window.size {w.size}); lower window.start")
    if w.max_interval < w.min_interval:
        raise ConfigError(f"window.max_interval={w.max_interval} must be >= window.min_interval={w.min_interval}")


def _check_tree(cfg: Config) -> None:
    t, steps = cfg.tree, cfg.sampler.num_steps
    if not t.enabled:
        return
    if not t.split_steps and t.split_rounds > steps:
        raise ConfigError(f"tree.split_rounds={t.split_rounds} exceeds sampler.num_steps={steps}; lower it or list tree.split_steps")
    try:
        splits = split_steps(cfg)
    except ValueError as err:
        raise ConfigError(f"tree.split_steps={list(t.split_steps)} is out of range for sampler.num_steps={steps}: {err}") from None
    leaves, shape = t.branching ** len(splits), f"tree.branching {t.branching} ** {len(splits)} splits"
    if t.adaptive_calls:
        leaves, shape = _adaptive_leaves(cfg, splits), f"tree.adaptive_calls={t.adaptive_calls}"
    if t.width_keep > leaves:
        raise ConfigError(f"tree.width_keep={t.width_keep} is larger than the {leaves} leaves per tree "
                          f"({shape}); lower tree.width_keep (0 = off)")
    bad = sorted(d for d in t.depth_pruning if not 1 <= d <= steps)
    if bad:
        raise ConfigError(f"tree.depth_pruning={list(t.depth_pruning)} holds depths {bad} outside [1, {steps}] "
                          f"(child depths of sampler.num_steps={steps})")
    if t.depth_stop != -1 and not 1 <= t.depth_stop <= steps:
        raise ConfigError(f"tree.depth_stop={t.depth_stop} must be -1 (the last split step) or in [1, {steps}]")


def _adaptive_leaves(cfg: Config, splits: tuple[int, ...]) -> int:
    """Leaves per adaptive tree (tree.adaptive_calls), or a ConfigError naming the key and the smallest budget."""
    t = cfg.tree
    if t.mix and cfg.window.tail == "dpm":
        raise ConfigError("tree.adaptive_calls counts the calls of the sampler's grid, which a compressed tail "
                          "(window.tail=dpm) shortens; set window.tail=euler or tree.adaptive_calls=0")
    try:
        counts = tree_rules.adaptive_split_counts(cfg.sampler.num_steps, splits, t.branching, t.adaptive_calls)
    except ValueError as err:
        raise ConfigError(f"tree.adaptive_calls={t.adaptive_calls}: {err}; raise it (0 = every node splits)") from None
    return 1 + sum(counts) * (t.branching - 1)


def _check_train(cfg: Config) -> None:
    t, last = cfg.train, trainable_positions(cfg)
    if not 0 < t.timestep_fraction <= 1:
        raise ConfigError(f"train.timestep_fraction={t.timestep_fraction} must be in (0, 1] (share of the steps trained "
                          "per sample; DanceGRPO uses 0.6)")
    if t.timesteps == "first_k" and t.first_k > last:
        raise ConfigError(f"train.first_k={t.first_k} is larger than the {last} trainable steps (sampler.num_steps="
                          f"{cfg.sampler.num_steps}, reward_image={cfg.sampler.reward_image}, noise={cfg.sampler.noise}); "
                          "lower train.first_k (0 = all of them)")
    if t.kl_beta > 0 and t.kl_scale == "reference" and _policy_family(cfg.policy.name) == "diffusion":
        raise ConfigError(f"train.kl_scale=reference divides the KL by eta^2, Flow-GRPO's flow scale; on the DDIM steps of "
                          f"policy {cfg.policy.name} that weighs the last step's KL about 0.0008x the exact one (50 SD steps); "
                          "set train.kl_scale=exact (the KL of the DDIM transitions)")
    if not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas={list(t.betas)} must both be in [0, 1); for example train.betas=[0.9,0.999]")
    if t.trust_region == "clip" and t.clip_range <= 0:
        raise ConfigError(f"train.clip_range={t.clip_range} must be > 0 with train.trust_region=clip (PPO's clip of the "
                          "importance ratio); or set train.trust_region=dppo")
    if t.trust_region == "dppo" and t.trust_region_kl <= 0:
        raise ConfigError(f"train.trust_region_kl={t.trust_region_kl} must be > 0 with train.trust_region=dppo (the bound on "
                          "the exact KL to the rollout step; Flow-DPPO uses 1e-5)")
    std_keys = [key for key, on in (("train.ratio_norm", t.ratio_norm != "none"), ("train.step_weight", t.step_weight == "tempflow"),
                                    ("train.trust_region", t.trust_region == "dppo")) if on]
    if std_keys and cfg.sampler.noise_level <= 0:
        raise ConfigError(f"{', '.join(std_keys)} need{'s' * (len(std_keys) == 1)} SDE steps with noise, but "
                          f"sampler.noise_level={cfg.sampler.noise_level}; set sampler.noise_level > 0")


def _policy_family(name: str) -> str:
    from flowgrove.policies import policy_family  # registers every policy (light: no model library loads)

    return policy_family(name)


def _check_cps(cfg: Config) -> None:
    """CPS draws ``std = g * sigma_next`` with the noise fraction ``g = sin(level * pi / 2)``: the level lies in [0, 1],
    a split child's fraction ``split_noise_scale * g`` is at most 1 and the last step (std 0) does not split; its
    transition std is the std Flow-GRPO's KL divides by, so ``train.kl_scale=reference`` has nothing to rescale."""
    s, t = cfg.sampler, cfg.tree
    if sde_type_of(s.noise) != "cps":
        return
    if s.noise_level > 1:
        raise ConfigError(f"sampler.noise_level={s.noise_level} with sampler.noise=cps must be in [0, 1] (the step keeps "
                          "sin(level * pi / 2) of the next noise level as fresh noise; 1 = all of it); Flow-GRPO uses 0.8")
    fraction = float(noise_g(s.noise, s.noise_level, 0.5, 0.5))
    if t.enabled and t.split_noise_scale * fraction > 1 + 1e-9:  # fraction > 0 here
        raise ConfigError(f"tree.split_noise_scale={t.split_noise_scale} with sampler.noise=cps at sampler.noise_level="
                          f"{s.noise_level} asks split children for {t.split_noise_scale * fraction:.3g} times the next "
                          f"noise level as fresh noise (at most 1); lower tree.split_noise_scale to "
                          f"<= {1 / fraction:.3g} or sampler.noise_level")
    if t.enabled and s.num_steps - 1 in split_steps(cfg):
        raise ConfigError(f"tree splits at the last step ({s.num_steps - 1}) with sampler.noise=cps, which draws no "
                          "noise onto sigma 0, so its children would be equal; list earlier tree.split_steps")
    if cfg.train.kl_beta > 0 and cfg.train.kl_scale == "reference":
        raise ConfigError("train.kl_scale=reference with sampler.noise=cps: Flow-GRPO's CPS KL divides by the CPS "
                          "transition std, which is the exact KL; set train.kl_scale=exact")


def _check_objective(cfg: Config) -> None:
    """GRPO trains the log-probs of sampled steps; a forward-process objective (nft, awm) trains the final samples,
    one advantage each, noised at grid times, with no log-prob of any step."""
    t, name = cfg.train, f"train.objective={cfg.train.objective}"
    if t.tail_anchor > 0 and (t.objective != "grpo" or not (cfg.window.enabled or cfg.tree.enabled)):
        raise ConfigError(f"train.tail_anchor={t.tail_anchor} holds the steps a window or tree leaves untrained, and "
                          f"{name} with window.enabled={cfg.window.enabled}, tree.enabled={cfg.tree.enabled} trains every "
                          "step it samples; set train.tail_anchor=0 or use a window or tree method")
    if t.objective == "grpo":
        if cfg.sampler.noise_level == 0:
            raise ConfigError("sampler.noise_level=0 makes every step deterministic, with no log-prob for GRPO to train; "
                              "set sampler.noise_level>0, or train.objective=nft or awm (they train without log-probs)")
        return
    if cfg.tree.enabled:
        raise ConfigError(f"{name} trains final samples with one advantage each, but tree rollouts credit shared prefixes "
                          "by depth; set tree.enabled=false (chains, windows and tails all serve it) or train.objective=grpo")
    if t.timesteps == "plan":
        raise ConfigError(f"train.timesteps=plan trains the plan's SDE steps, but {name} noises the final samples at "
                          "grid times; set train.timesteps=random_fraction (a share per sample) or first_k")
    terms = {"train.ratio_norm": (t.ratio_norm, "none"), "train.step_weight": (t.step_weight, "none"),
             "train.trust_region": (t.trust_region, "clip")}
    for key, (value, plain) in terms.items():
        if value != plain:
            raise ConfigError(f"{key}={value} reshapes GRPO's per-transition log-ratio, which {name} does not have; "
                              f"set {key}={plain} or train.objective=grpo")
    if t.kl_scale != "exact":
        raise ConfigError(f"train.kl_scale={t.kl_scale} rescales the transition KL of GRPO; {name} penalises the mean "
                          "squared output difference to the initial policy (train.kl_beta) instead; drop train.kl_scale")
    if t.objective == "nft" and t.nft_beta <= 0:
        raise ConfigError(f"train.nft_beta={t.nft_beta} must be > 0 for {name} (DiffusionNFT uses 1.0, 0.1 for OCR)")
    if t.objective == "awm" and (t.awm_power <= 0 or t.clip_range <= 0):
        raise ConfigError(f"train.awm_power={t.awm_power} and train.clip_range={t.clip_range} must be > 0 for {name} "
                          "(AWM uses 0.25 and 1.0)")
    if cfg.sampler.noise_level == 0 and cfg.rollout.same_noise_in_group:
        raise ConfigError("sampler.noise_level=0 with rollout.same_noise_in_group=true makes the images of a group "
                          "identical (one initial noise, no sampling noise), so every advantage is 0; set "
                          "rollout.same_noise_in_group=false")


def _check_memory(cfg: Config) -> None:
    """``policy.quantize`` quantises the frozen base of a LoRA run (DDP or one process: FSDP2 does not shard
    quantised weights here), on a device and with a library that hold it; ``run.offload`` is FSDP2's offload of
    parameters, gradients and optimizer state together (``train.optimizer`` has its own choices)."""
    p, offload = cfg.policy, cfg.run.offload
    if offload == "optimizer":
        raise ConfigError(f"run.offload=optimizer: torch {torch.__version__.split('+')[0]}'s FSDP2 has no optimizer-only "
                          "offload (its CPUOffloadPolicy moves parameters, gradients and optimizer state together); "
                          "set run.offload=params, or train.optimizer=adamw8bit for a smaller optimizer state")
    if p.quantize == "none":
        return
    if p.lora_rank <= 0:
        raise ConfigError(f"policy.quantize={p.quantize} quantises the frozen base under LoRA, but policy.lora_rank=0 "
                          "trains every weight of it; set policy.lora_rank (e.g. 16) or policy.quantize=none")
    if cfg.run.parallel == "fsdp" or offload == "params":
        key = "run.parallel=fsdp" if cfg.run.parallel == "fsdp" else "run.offload=params"
        raise ConfigError(f"policy.quantize={p.quantize} with {key}: FSDP2 does not shard quantised weights here; "
                          "set run.parallel=auto (DDP for LoRA) and run.offload=none, or policy.quantize=none")
    auto = "cuda" if torch.cuda.is_available() else "cpu"  # run.device=auto, as distributed.resolve_device picks
    check_quantize(p.quantize, torch.device(auto if cfg.run.device == "auto" else cfg.run.device))


def _check_reward_names(cfg: Config) -> None:
    from flowgrove.rewards import reward_names

    for name in cfg.rewards:
        if name not in reward_names():
            raise ConfigError(f"rewards.{name} is not a registered reward{did_you_mean(name, reward_names())}; "
                              f"known rewards: {', '.join(reward_names())}")
    for name, options in cfg.reward_options.items():
        if name not in cfg.rewards:
            raise ConfigError(f"reward_options.{name} sets options of a reward that is not in rewards "
                              f"({', '.join(cfg.rewards)}); add rewards.{name}=WEIGHT or drop reward_options.{name}")
        if not isinstance(options, dict):
            raise ConfigError(f"reward_options.{name}={options!r} must map option names to values, "
                              f"for example reward_options.{name}.batch_size=16")


# List fields: the type of their items and the required length (None: any length).
_LIST_ITEMS: dict[str, tuple[type, int | None]] = {
    "policy.lora_targets": (str, None),
    "train.betas": (float, 2),
    "tree.split_steps": (int, None),
    "tree.depth_pruning": (int, None),
}


_KIND = {float: "number", int: "integer", str: "string"}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _item_ok(item: object, kind: type) -> bool:
    return _is_number(item) if kind is float else isinstance(item, kind) and not isinstance(item, bool)


def _check_list(cfg: Config, key: str, kind: type, length: int | None) -> None:
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    f = next(f for f in dataclasses.fields(getattr(cfg, section)) if f.name == name)
    help_text = f.metadata["help"].rstrip(".")
    if length is not None and len(value) != length:
        example = ",".join(map(str, f.default_factory()))
        raise ConfigError(f"{key}={value} must hold exactly {length} {_KIND[kind]}s ({help_text}); for example {key}=[{example}]")
    bad = next((item for item in value if not _item_ok(item, kind)), None)
    if bad is not None:
        raise ConfigError(f"{key}={value} must be a list of {_KIND[kind]}s ({help_text}); {bad!r} is not one")


def _check_rewards(rewards: object) -> None:
    """A mapping of reward names to finite numbers, not all zero (weights are used as given; negative ones penalise)."""
    if not isinstance(rewards, dict) or not rewards:
        raise ConfigError(f"rewards={rewards!r} must map reward names to weights; for example "
                          "rewards={digit_classifier: 1.0, boldness: 1.0}")
    for name, weight in rewards.items():
        if weight is None and ":" in str(name):
            key, value = str(name).split(":", 1)
            raise ConfigError(f"rewards holds {name!r} without a weight: YAML needs a space after the colon, "
                              f"for example rewards={{{key}: {value}}}")
        if not _is_number(weight) or not math.isfinite(weight):
            raise ConfigError(f"rewards.{name}={weight!r} is not a number; give the reward a numeric weight, "
                              f"for example rewards.{name}=1.0")
    if not any(rewards.values()):
        raise ConfigError(f"every weight in rewards={rewards} is 0; give at least one reward a nonzero weight, "
                          f"for example rewards.{next(iter(rewards))}=1.0")


def check_device(device: str) -> None:
    """``run.device`` must name a device this machine has (``auto``: CUDA when present, else the CPU)."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"run.device={device!r} is not a torch device ({one_line(err)}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build that finds no GPU"
        raise ConfigError(f"run.device={device!r} but this machine has no usable CUDA device (torch {torch.__version__} is "
                          f"{build}); set run.device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"run.device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"pick cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"run.device={device!r} but MPS is not available on this machine; set run.device=cpu")
