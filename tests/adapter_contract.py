"""The shared adapter tests: what every policy family must satisfy (design.md section 2, policies/base.py).

A family's test file builds its policy (a tiny random pipeline saved and loaded through the family's real factory)
and calls :func:`check_policy_contract`; nothing here knows any family.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch

from flowgrove.config.load import load_config
from flowgrove.policies.base import Conditioning, FlowPolicy
from flowgrove.training.trainer import GRPOTrainer

from conftest import restore_checkpoint


def mean_brightness(images: torch.Tensor, prompts) -> torch.Tensor:
    """A reward for images [B, 3, H, W] or videos [B, F, 3, H, W] in [0, 1]."""
    return images.float().flatten(1).mean(dim=1)  # [B]


def check_policy_contract(policy: FlowPolicy, prompts: Sequence[str], *, steps: int = 3, atol: float = 1e-5,
                          exports: bool = True) -> None:
    """Shapes, dtypes, ranges, batch independence, one GRPO step that moves the trainable weights, and (``exports``)
    :func:`check_export_round_trip`; a module of several pipeline components (Wan 2.2's two experts) checks its
    exports in its family's tests instead."""
    shape = tuple(policy.latent_shape)
    assert len(shape) >= 3 and all(isinstance(n, int) and n > 0 for n in shape), shape  # (C, H, W) or (C, F, H, W)
    cond = policy.encode_prompts(list(prompts))
    assert isinstance(cond, Conditioning) and len(cond) == len(prompts)
    device = next(policy.module.parameters()).device
    cond = cond.to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((len(prompts), *shape), generator=gen).to(device)  # [B, *latent_shape]
    sigma = torch.linspace(0.9, 0.3, len(prompts), device=device)
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond)
        assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()
        # each row depends on its own latent, sigma and prompt only (batched rollouts rely on it)
        single = torch.cat([policy.velocity(x[i:i + 1], sigma[i:i + 1], cond.select(torch.tensor([i]))) for i in range(len(prompts))])
        torch.testing.assert_close(single, v, atol=atol, rtol=1e-4)
        images = policy.decode(x.clamp(-1, 1))
    assert images.shape[0] == len(prompts) and images.shape[-3] == 3 and images.ndim in (4, 5), images.shape
    assert images.is_floating_point() and float(images.min()) >= 0 and float(images.max()) <= 1
    trainable = [p for p in policy.module.parameters() if p.requires_grad]
    assert trainable, "the policy's module has no trainable parameters"

    cfg = load_config(None, ["rollout.prompts_per_step=1", "rollout.group_size=2", f"sampler.num_steps={steps}",
                             f"eval.num_steps={steps}", "eval.samples_per_prompt=1", "train.micro_batch=1000",
                             "rewards={brightness: 1.0}", "run.device=cpu" if device.type == "cpu" else "run.device=auto"])
    trainer = GRPOTrainer(cfg, policy, {"brightness": mean_brightness}, list(prompts))
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.step()
    assert metrics["first_ratio_max_dev"] < 1e-3 and metrics["updates"] >= 1
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.params)), "no trainable weight moved"
    held_out = trainer.evaluate()
    assert torch.isfinite(torch.tensor(held_out["reward"]))
    if not exports:
        return
    with tempfile.TemporaryDirectory() as out:
        check_export_round_trip(policy, cond, Path(out))


def _trained_module_folder(out: Path, component: str | None = None) -> Path:
    """Where ``export_full`` put the module: ``out`` (a transformer folder) or ``out/component`` (a pipeline folder;
    by default ``out/transformer`` or ``out/unet``)."""
    if (out / "config.json").is_file():
        return out
    if component is not None:
        return out / component
    return out / "transformer" if (out / "transformer").is_dir() else out / "unet"


def check_export_round_trip(policy: FlowPolicy, cond: Conditioning, out: Path, atol: float = 1e-6,
                            component: str | None = None) -> None:
    """``export_full`` reloads with the module's class ``from_pretrained`` (from the pipeline folder's
    ``component``, default ``transformer`` or ``unet``) to equal weights; ``export_lora`` of a random LoRA (alpha
    2r, folded by ``folded_lora``) reloads with ``load_lora_adapter`` into a copy of the base module and gives the
    LoRA policy's velocity. Checks only the methods the policy has."""
    from flowgrove.runs.export import LORA_FILE, folded_lora

    module = policy.module
    if hasattr(policy, "export_full"):
        policy.export_full(out / "full")
        loaded = type(module).from_pretrained(str(_trained_module_folder(out / "full", component))).state_dict()
        trained = module.state_dict()
        assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], v) for k, v in trained.items())
    if not hasattr(policy, "export_lora"):
        return
    from peft import LoraConfig

    from flowgrove.config.load import PolicyConfig

    base = copy.deepcopy(module)
    module.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=PolicyConfig().lora_targets))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:  # peft starts lora_B at zero: the LoRA would change nothing
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    device = next(module.parameters()).device
    x = torch.randn((len(cond), *policy.latent_shape), generator=gen).to(device)
    sigma = torch.linspace(0.8, 0.4, len(cond), device=device)
    try:
        with torch.no_grad():
            trained_v = policy.velocity(x, sigma, cond)
            state, lora_config = folded_lora(module)
            policy.export_lora(state, lora_config, out / "lora")
            policy.module = base
            assert (policy.velocity(x, sigma, cond) - trained_v).abs().max() > 1e-3  # the LoRA changes the output
            from safetensors import safe_open

            with safe_open(str(out / "lora" / LORA_FILE), framework="pt") as f:
                prefix = next(iter(f.keys())).split(".")[0]  # the pipeline's component: transformer, unet
            base.load_lora_adapter(str(out / "lora"), prefix=prefix, weight_name=LORA_FILE)
            assert (policy.velocity(x, sigma, cond) - trained_v).abs().max() <= atol
    finally:
        policy.module = module


# ---- presets through the CLI, and their exports back into the family's diffusers pipeline -------------------------

# Small tree and window settings that pass config validation: 2 leaves per prompt from one split at step 0 of 3;
# a 1-step SDE window over 4 steps. Either trains 2 steps on 1 prompt x 2 samples.
TREE = ("--method", "branchgrpo", "tree.split_steps=[0]", "sampler.num_steps=3")
WINDOW = ("--method", "mixgrpo", "window.size=1", "window.interval=1", "sampler.num_steps=4")
SMALL = ("--steps", "2", "rollout.prompts_per_step=1", "rollout.group_size=2", "eval.num_steps=3",
         "eval.samples_per_prompt=1", "train.accumulate_size=2", "run.device=cpu", "run.progress=false",
         "train.lr=1e-2", "policy.dtype=float32")


def train_and_export(root: Path, preset: Sequence[str], policy_args: Sequence[str], reward: str,
                     prompt_file: Path | None = None) -> tuple[Path, Path]:
    """``flowgrove train`` with ``preset`` on a tiny pipeline, then ``flowgrove export``; returns (run, export).
    ``prompt_file``: the training prompts (an edit model's rows with input images); else two text prompts."""
    from flowgrove.cli import main

    if prompt_file is None:
        prompt_file = root / "prompts.txt"
        prompt_file.write_text("a cat\na dog\n")
    run, out = root / "run", root / "export"
    assert main(["train", *preset, "--out", str(run), *SMALL, *policy_args, f"rewards={{{reward}: 1.0}}",
                 f"data.train={prompt_file}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == preset[1] and summary["steps"] == 2
    assert main(["export", str(run), "--out", str(out)]) == 0
    meta, body = read_card(out)
    assert meta["library_name"] == "diffusers" and preset[1] in meta["tags"] and "## Held-out results" in body
    return run, out


def read_card(out: Path) -> tuple[dict, str]:
    """The export's model card ``README.md``: its YAML front matter and its body."""
    import yaml

    _, meta, body = (out / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(meta), body


def run_trainer(run: Path, checkpoint: str = "step_000002") -> GRPOTrainer:
    """A trainer holding a run's checkpoint (raw weights; EMA in ``trainer.ema``), built from its config."""
    from flowgrove.config.load import config_from_yaml_text
    from flowgrove.training.setup import build_trainer

    ckpt = run / "checkpoints" / checkpoint
    trainer = build_trainer(config_from_yaml_text((ckpt / "config.yaml").read_text()))
    restore_checkpoint(trainer, ckpt)
    return trainer


def check_pipeline_lora_export(run: Path, out: Path, base: FlowPolicy, prompts: Sequence[str], atol: float) -> None:
    """``base.pipe.load_lora_weights(out)`` (the untrained policy's own pipeline, default adapter scale) gives the
    trained run's velocity: the export holds the family's diffusers keys with alpha folded in."""
    policy = run_trainer(run).policy
    cond = base.encode_prompts(list(prompts))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((len(prompts), *base.latent_shape), generator=gen)
    sigma = torch.linspace(0.9, 0.4, len(prompts))
    with torch.no_grad():
        trained, before = policy.velocity(x, sigma, cond), base.velocity(x, sigma, cond)
        assert (trained - before).abs().max() > 1e-4  # training moved the LoRA, so the comparison means something
        base.pipe.load_lora_weights(str(out))
        torch.testing.assert_close(base.velocity(x, sigma, cond), trained, atol=atol, rtol=0)


def check_full_export(run: Path, out: Path, transformer_cls: type, subfolder: str = "transformer") -> None:
    """The exported transformer loads with the family's class ``from_pretrained`` and equals the trained weights."""
    trained = run_trainer(run).policy.module.state_dict()
    loaded = transformer_cls.from_pretrained(str(out), subfolder=subfolder).state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], v) for k, v in trained.items())


def check_edit_presets(kind: str, root: Path, policy_args: Sequence[str], prompt_file: Path,
                       base: Callable[[], FlowPolicy], prompts: Sequence[str], transformer_cls: type) -> None:
    """An edit family's ``tree-lora`` (TREE with LoRA; the export loads back with ``load_lora_weights``) or
    ``window-full`` (WINDOW, full fine-tune; the transformer reloads) run from ``prompt_file``'s rows with input
    images; ``base()`` builds the untrained policy, ``prompts`` are rows for the velocity comparison."""
    if kind == "tree-lora":
        run, out = train_and_export(root, TREE, [*policy_args, "policy.lora_rank=4"], "brightness", prompt_file)
        check_pipeline_lora_export(run, out, base(), prompts, atol=1e-6)
    else:
        run, out = train_and_export(root, WINDOW, [*policy_args, "policy.lora_rank=0"], "brightness", prompt_file)
        check_full_export(run, out, transformer_cls)
