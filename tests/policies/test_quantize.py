"""policy.quantize: the frozen base of a LoRA run stored in int8 / float8 (torchao) or NF4 (bitsandbytes), built
through the shared policy setup for a tiny FLUX folder and the digits policy; rollouts and training use the same
quantised base (first ratio 1), the adapters stay float32 masters, and export writes the LoRA for the unquantised
base."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from flowgrove.cli import main
from flowgrove.config.load import load_config
from flowgrove.policies.quantize import QUANTIZERS, quantize_base, transformer_blocks
from flowgrove.training.prepare import prepare_policy
from flowgrove.training.trainer import GRPOTrainer

from adapter_contract import mean_brightness
from test_policies import _save_tiny_flux_pipeline

pytest.importorskip("torchao")
TINY = ["rollout.prompts_per_step=1", "rollout.group_size=2", "sampler.num_steps=3", "eval.num_steps=3",
        "eval.samples_per_prompt=1", "run.progress=false", "train.lr=1e-2", "rewards={brightness: 1.0}",
        "run.device=cpu"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    _save_tiny_flux_pipeline(root / "pipe")
    (root / "prompts.txt").write_text("a cat\na dog\n")
    return root


def _flux(folder, *extra: str) -> list[str]:
    return ["policy.name=flux1", f"policy.path={folder / 'pipe'}", "policy.lora_rank=4",
            "policy.options={height: 16, width: 16, max_sequence_length: 8}", *extra]


def _base_layers(module: nn.Module) -> list[nn.Module]:
    """The base linear layers of the transformer blocks (inside peft's LoRA wrappers)."""
    return [m for block in transformer_blocks(module) for name, m in block.named_modules()
            if "lora_" not in name and isinstance(m, nn.Linear)]


@pytest.mark.parametrize("kind", list(QUANTIZERS))
@pytest.mark.parametrize("policy", ["flux1", "digits"])
def test_a_quantised_base_trains_its_float32_adapters_with_ratio_one(flux_folder, policy, kind):
    if kind == "nf4":
        pytest.importorskip("bitsandbytes")
    args = _flux(flux_folder, "policy.dtype=bfloat16") if policy == "flux1" else ["policy.lora_rank=4"]
    cfg = load_config(None, [*TINY, *args, f"policy.quantize={kind}"])
    plain = prepare_policy(load_config(None, [*TINY, *args]), torch.device("cpu"))
    torch.manual_seed(0)
    quantised = prepare_policy(cfg, torch.device("cpu"))

    layers = _base_layers(quantised.module)
    assert layers and all(type(m.weight) is not nn.Parameter for m in layers)  # torchao tensors, bnb's Params4bit
    outside = [m for name, m in quantised.module.named_children() if not isinstance(m, nn.ModuleList)]
    assert all(type(p) is nn.Parameter for m in outside for p in m.parameters())  # embedders stay as loaded
    trainable = [p for p in quantised.module.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and type(p) is nn.Parameter for p in trainable)

    # the same velocity as the unquantised base, up to the weights' rounding (the LoRA starts at B = 0)
    shape = quantised.latent_shape
    x, sigma = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1)), torch.tensor([0.9, 0.4])
    prompts = ["a cat", "a dog"] if policy == "flux1" else ["a handwritten zero", "a handwritten one"]
    with torch.no_grad():
        want = plain.velocity(x, sigma, plain.encode_prompts(prompts))
        got = quantised.velocity(x, sigma, quantised.encode_prompts(prompts))
    error = float((got - want).norm() / want.norm())
    assert 0 < error < (0.2 if QUANTIZERS[kind].bits == 4 else 0.05), error

    trainer = GRPOTrainer(cfg, quantised, {"brightness": mean_brightness}, prompts)
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.step()
    assert metrics["first_ratio_max_dev"] < 1e-5 and metrics["updates"] == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.params))


def test_none_and_a_module_without_blocks_quantise_nothing():
    model = nn.Sequential(nn.Linear(4, 4))
    assert quantize_base(model, "int8", torch.float32) == 0 and type(model[0].weight) is nn.Parameter
    blocks = nn.Module()
    blocks.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))])
    assert quantize_base(blocks, "none", torch.float32) == 0
    assert quantize_base(blocks, "int8", torch.float32) == 2


def test_policy_quantize_int8_trains_two_lora_steps_and_exports_for_the_unquantised_base(flux_folder, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--steps", "2", "--out", str(run), *_flux(flux_folder, "policy.quantize=int8"),
            f"data.train={flux_folder / 'prompts.txt'}", "run.checkpoint_every=1", *TINY]
    assert main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["first_ratio_max_dev"] < 1e-5
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "lora")]) == 0
    err = capsys.readouterr().err
    assert "quantised to int8" in err and "LoRA for the unquantised base" in err

    # the exported LoRA loads onto the unquantised base, as diffusers does
    from diffusers import FluxTransformer2DModel

    base = FluxTransformer2DModel.from_pretrained(str(flux_folder / "pipe"), subfolder="transformer")
    base.load_lora_adapter(str(tmp_path / "lora"), prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in base.named_parameters())


def test_checkpoints_hold_the_adapters_not_the_nf4_state_of_the_base():
    pytest.importorskip("bitsandbytes")
    from flowgrove.runs import sharded
    from flowgrove.training.parts import TrainingState

    policy = prepare_policy(load_config(None, [*TINY, "policy.lora_rank=4", "policy.quantize=nf4"]), torch.device("cpu"))
    params = [p for p in policy.module.parameters() if p.requires_grad]
    state = TrainingState(policy.module, torch.optim.AdamW(params), params, None, None, 0, {})
    saved = sharded.training_state(state, with_optimizer=False)["model"]
    assert set(saved) == set(sharded.trainable_names(policy.module)) | {n for n, _ in policy.module.named_buffers()}
    assert saved and all("lora_" in key for key in saved)  # the digits transformer has no buffers
