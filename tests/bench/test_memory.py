"""``flowgrove memory``: the shipped counts recount exactly, the measured activation lines extrapolate, and the
prediction of a training step's peak matches the peak measured on the CPU (live tensor bytes) for tiny models of
several families, LoRA and full, with and without gradient checkpointing."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from flowgrove import cli
from flowgrove.bench.memory import GIB, MemoryPlan, lora_params, predict
from flowgrove.bench.memory_inputs import INPUTS
from flowgrove.bench.memory_sizes import (LiveBytes, add_lora, count, diffusers_class, family_configs,
                                          lora_dims, measured_lines, meta_model, model_sizes, saved_by_unit,
                                          shipped_sizes)
from flowgrove.bench.models import build_random
from flowgrove.recipes import memory
from flowgrove.training.prepare import float32_masters

pytest.importorskip("diffusers")

# family -> (transformer class, a tiny config of the same architecture, latent pixels per token, frames per token)
TINY = {
    "flux": ("FluxTransformer2DModel", {"patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2,
                                        "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 32,
                                        "pooled_projection_dim": 16, "axes_dims_rope": [4, 6, 6]}, 16, 0),
    "flux2": ("Flux2Transformer2DModel", {"patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2,
                                          "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 32,
                                          "timestep_guidance_channels": 32, "axes_dims_rope": [4, 4, 4, 4]}, 16, 0),
    "sd3": ("SD3Transformer2DModel", {"sample_size": 32, "patch_size": 2, "in_channels": 4, "num_layers": 3,
                                      "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 32,
                                      "caption_projection_dim": 64, "pooled_projection_dim": 16, "out_channels": 4,
                                      "pos_embed_max_size": 32, "qk_norm": "rms_norm"}, 16, 0),
    "wan": ("WanTransformer3DModel", {"patch_size": [1, 2, 2], "num_attention_heads": 4, "attention_head_dim": 16,
                                      "in_channels": 4, "out_channels": 4, "text_dim": 32, "freq_dim": 32,
                                      "ffn_dim": 128, "num_layers": 3, "rope_max_seq_len": 32}, 16, 4),
    "qwen_image": ("QwenImageTransformer2DModel", {"patch_size": 2, "in_channels": 16, "out_channels": 4,
                                                   "num_layers": 3, "attention_head_dim": 16, "num_attention_heads": 4,
                                                   "joint_attention_dim": 32, "axes_dims_rope": [4, 6, 6]}, 16, 0),
}
TEXT = 16
SIDE = 16  # validated at 16 x 16 latent tokens: beyond the two measured sides (4 and 8), so the lines extrapolate


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def measured_training_peak(cls_name: str, config: dict, lora: bool, checkpointing: bool) -> float:
    """Bytes at the peak of one training step (forward under bf16 autocast, backward, AdamW step) of a bf16 model
    with float32 trainable weights, as ``training/prepare.prepare_policy`` makes it: the parameters and AdamW's
    state (after a first step created it) plus the peak of the live tensors the step creates."""
    torch.manual_seed(0)
    model = build_random(diffusers_class(cls_name), config, torch.device("cpu"), torch.bfloat16)
    model.train()
    if lora:
        add_lora(model)
    else:
        model.requires_grad_(True)
    float32_masters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    inputs = INPUTS[cls_name](config, SIDE, TEXT, torch.bfloat16)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs, return_dict=False)[0]
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from here on
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    resident = _storages([*model.parameters(), *state])
    with LiveBytes(skip=frozenset(resident)) as live:
        step()
    return sum(resident.values()) + live.peak


@pytest.mark.parametrize("family", sorted(TINY))
def test_the_predicted_training_peak_of_tiny_models_is_within_15_percent_of_the_measured(family):
    cls_name, config, patch, frames = TINY[family]
    sizes = model_sizes(family, cls_name, config, {}, TEXT, patch, frames)
    for lora, checkpointing in ((True, False), (True, True), (False, False), (False, True)):
        plan = MemoryPlan(dtype="bfloat16", lora_rank=4 if lora else 0, parallel="none", checkpointing=checkpointing,
                          micro_batch=1, height=SIDE * patch, width=SIDE * patch, frames=1, text_tokens=TEXT)
        predicted = predict(sizes, plan).training
        measured = measured_training_peak(cls_name, config, lora, checkpointing)
        assert abs(predicted - measured) <= 0.15 * measured, (family, lora, checkpointing, predicted, measured)


def test_the_activation_lines_predict_a_third_measured_token_count():
    """The --verify of the old scripts/fsdp_memory.py: lines through 4x4 and 8x8 tokens give 12x12's bytes."""
    cls_name, config, _, _ = TINY["flux"]
    model = build_random(diffusers_class(cls_name), config, torch.device("cpu"), torch.bfloat16).requires_grad_(True)
    lines = measured_lines(model, cls_name, config, TEXT, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = saved_by_unit(model, INPUTS[cls_name](config, 12, TEXT, torch.bfloat16))
    n = 12 * 12 + TEXT
    for unit, saved in zip(lines.units, measured.units.values()):
        assert unit.saved(n) == pytest.approx(saved, rel=0.01)
    assert lines.outside(n) == pytest.approx(measured.outside, rel=0.05)


def test_the_shipped_counts_of_flux1_dev_recount_exactly_on_the_meta_device():
    shipped = shipped_sizes()
    assert set(shipped) == set(family_configs())
    cls_name, config = family_configs()["flux1-dev"]["transformer"]
    model = meta_model(cls_name, config)
    flux = shipped["flux1-dev"]
    assert flux.params == count(model) == 11_901_408_320
    assert [u.params for u in flux.units] == [count(b) for b in (*model.transformer_blocks,
                                                                 *model.single_transformer_blocks)]
    assert flux.lora_dims == lora_dims(model)


def test_the_shipped_counts_of_wan2_2_ti2v_5b_recount_on_the_meta_device_and_match_the_published_5b():
    cls_name, config = family_configs()["wan2.2-ti2v-5b"]["transformer"]
    model = meta_model(cls_name, config)
    wan = shipped_sizes()["wan2.2-ti2v-5b"]
    assert wan.params == count(model) == 4_999_787_712  # Wan-AI/Wan2.2-TI2V-5B: "5B"
    assert [u.params for u in wan.units] == [count(b) for b in model.blocks]
    assert wan.lora_dims == lora_dims(model) and wan.patch == 32  # VAE 16x, patch 2


def test_z_image_is_the_default_family_of_its_policy_and_recounts_6_15b_on_the_meta_device():
    cls_name, config = family_configs()["z-image"]["transformer"]
    assert shipped_sizes()["z-image"].params == count(meta_model(cls_name, config)) == 6_154_908_736  # published: 6B
    from flowgrove.config.load import load_config

    assert memory.predict_config(load_config(None, ["policy.name=z_image"])).family == "z-image"


def test_the_shipped_counts_of_flux2_dev_recount_on_the_meta_device_and_match_the_published_32b_and_24b():
    from flowgrove.bench.memory_sizes import text_encoder_params

    family = family_configs()["flux2-dev"]
    model = meta_model(*family["transformer"])
    flux2 = shipped_sizes()["flux2-dev"]
    assert flux2.params == count(model) == 32_223_281_152  # black-forest-labs/FLUX.2-dev: "32B"
    assert [u.params for u in flux2.units] == [count(b) for b in (*model.transformer_blocks,
                                                                  *model.single_transformer_blocks)]
    assert flux2.lora_dims == lora_dims(model) and flux2.patch == 16 and flux2.joint_text
    # Mistral-Small-3.1-24B with its (loaded, unused for text) Pixtral vision tower: "24B"
    assert flux2.text_encoder_params == text_encoder_params(family["text_encoders"]) == 24_011_361_280
    assert 3.8e9 < shipped_sizes()["flux2-klein-4b"].params < 4.0e9  # FLUX.2 [klein] 4B


def test_an_input_image_doubles_the_image_tokens_of_an_edit_model_and_changes_nothing_else():
    """FLUX.1 Kontext is FLUX.1-dev's transformer with the input image's 4096 tokens (1024^2) after the output's:
    its activations are FLUX.1-dev's with 4096 more tokens in the sequence, every other line item is equal."""
    kontext, flux = shipped_sizes()["flux1-kontext-dev"], shipped_sizes()["flux1-dev"]
    assert (kontext.image_tokens, flux.image_tokens) == (1, 0)
    assert kontext.tokens(1024, 1024, 1, 512) == 2 * 4096 + 512 and flux.tokens(1024, 1024, 1, 512) == 4096 + 512
    plan = MemoryPlan(lora_rank=32, checkpointing=True, text_tokens=512)
    edit, base = predict(kontext, plan).items, predict(flux, plan).items
    assert edit["activations"] > 1.5 * base["activations"]
    longer = predict(flux, replace(plan, text_tokens=512 + 4096)).items  # joint text: 4096 more tokens
    for key in ("activations", "backward transient"):
        assert edit[key] == pytest.approx(longer[key], rel=1e-9)
    assert {k: v for k, v in edit.items() if k not in ("activations", "backward transient")} == pytest.approx(
        {k: v for k, v in base.items() if k not in ("activations", "backward transient")}, rel=1e-9)
    # Qwen-Image-Edit encodes the input at policy.options.image_area, not at the output's size
    qie = shipped_sizes()["qwen-image-edit"]
    assert qie.tokens(512, 512, 1, 2048, input_pixels=1024 * 1024) == 1024 + 4096 + 2048


def test_wan2_2_a14b_high_keeps_the_second_expert_frozen_and_both_trains_its_adapters_too():
    a14b = shipped_sizes()["wan2.2-a14b"]
    one = replace(a14b, experts=1)  # the same transformer alone: Wan 2.1 14B's
    assert a14b.experts == 2 and a14b.params == shipped_sizes()["wan2.1-14b"].params == 14_288_491_584
    plan = MemoryPlan(lora_rank=32, checkpointing=True, height=480, width=832, frames=81)
    high, single = predict(a14b, plan).items, predict(one, plan).items
    both = predict(a14b, replace(plan, expert="both")).items
    assert high["frozen weights"] - single["frozen weights"] == a14b.params * 2  # the idle expert in bf16
    assert {k: v for k, v in high.items() if k != "frozen weights"} == {k: v for k, v in single.items()
                                                                         if k != "frozen weights"}
    adapter = lora_params(a14b, plan.lora_targets, 32)
    assert both["trainable weights (float32)"] - high["trainable weights (float32)"] == adapter * 4
    assert both["optimizer state"] - high["optimizer state"] == adapter * 8
    assert both["gradients"] - high["gradients"] == adapter * 4
    assert both["frozen weights"] == high["frozen weights"]  # two bf16 bases either way
    # the expert with no row of the micro-batch runs one at weight 0: one more row of activations
    assert both["activations"] == pytest.approx(predict(a14b, replace(plan, micro_batch=2)).items["activations"])
    # policy.quantize quantises the idle expert as it does the trained one (prepare_policy's frozen_modules)
    int8 = replace(plan, quantize="int8")
    assert (predict(a14b, int8).items["frozen weights"] == 2 * predict(one, int8).items["frozen weights"]
            == 2 * (a14b.linear_weights * 1 + (a14b.params - a14b.linear_weights) * 2))


def test_expert_is_read_from_policy_options_and_refused_on_a_one_expert_model(tmp_path, capsys):
    assert cli.main(["memory", "policy.name=wan", "policy.options.expert=both", "--model", "wan2.2-a14b",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["expert"] == "both"
    assert cli.main(["memory", "policy.name=wan", "policy.options.expert=both"]) == 2
    err = capsys.readouterr().err.strip()
    assert "policy.options.expert=both needs a two-expert model" in err and "--model wan2.2-a14b" in err
    assert "\n" not in err
    cls_name, config = family_configs()["wan2.2-a14b"]["transformer"]  # a folder as Wan2.2-T2V-A14B ships
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.875,
                                                              "transformer": ["diffusers", cls_name],
                                                              "transformer_2": ["diffusers", cls_name]}))
    for sub in ("transformer", "transformer_2"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps({"_class_name": cls_name, **config}))
    assert cli.main(["memory", "policy.name=wan", f"policy.path={tmp_path}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "wan2.2-a14b"
    # the rule the wan policy loads by: a transformer_2/ folder that model_index.json does not name is not an expert
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.875}))
    assert cli.main(["memory", "policy.name=wan", f"policy.path={tmp_path}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] != "wan2.2-a14b"


def _flux_lora(*extra: str):
    from flowgrove.config.load import load_config

    return load_config(None, ["policy.name=flux1", "policy.dtype=bfloat16", "policy.lora_rank=32",
                              "train.gradient_checkpointing=true", "train.micro_batch=1", "policy.options.height=1024",
                              "policy.options.width=1024", "policy.offload_text_encoders=true", "rollout.decode_batch=1",
                              *extra])


def test_flux1_dev_lora_bf16_1024_with_checkpointing_is_plausible_and_int8_saves_the_weight_bytes():
    p = memory.predict_config(_flux_lora())
    gib = p.estimate.gib()
    assert 22 < gib["frozen weights"] < 22.3  # 11.9 B bf16 weights
    assert 23 < gib["peak"] < 30
    sizes = shipped_sizes()["flux1-dev"]
    int8 = predict(sizes, replace(p.plan, quantize="int8")).peak / GIB
    saved = sizes.linear_weights * (2 - 1) / GIB
    assert gib["peak"] - int8 == pytest.approx(saved, rel=1e-6)
    assert predict(sizes, replace(p.plan, quantize="nf4")).peak < int8 * GIB


def test_memory_json_and_table_on_the_command_line(capsys):
    args = ["memory", "policy.name=flux1", "policy.lora_rank=32", "train.gradient_checkpointing=true", "--json",
            "policy.options.height=1024", "policy.options.width=1024", "train.micro_batch=1"]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "flux1-dev" and out["plan"]["lora_rank"] == 32 and out["gib"]["peak"] > 20
    assert cli.main(["memory", "--table"]) == 0
    table = capsys.readouterr().out
    titles = ("FLUX.1-dev", "SD3.5-Medium", "SD3.5-Large", "Qwen-Image", "Wan 2.1 1.3B", "Wan 2.1 14B", "HunyuanVideo",
              "SDXL", "Wan 2.2 TI2V-5B", "Z-Image", "FLUX.2 [dev]", "FLUX.2 [klein] 4B", "FLUX.1 Kontext [dev]",
              "Qwen-Image-Edit", "Wan 2.2 A14B")
    assert sorted(titles) == sorted(f["title"] for f in family_configs().values())
    for title in titles:
        assert f"| {title} | LoRA r32 | 1 |" in table and f"| {title} | full | 8 |" in table


def test_the_family_is_the_one_whose_config_the_policy_folder_holds(tmp_path, capsys):
    """A Wan folder with the 1.3B transformer config is predicted as Wan 2.1 1.3B, not the 14B default."""
    cls_name, config = family_configs()["wan2.1-1.3b"]["transformer"]
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": cls_name, **config}))
    assert cli.main(["memory", "policy.name=wan", f"policy.path={tmp_path}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "wan2.1-1.3b"
    assert cli.main(["memory", "policy.name=wan", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "wan2.1-14b"


@pytest.mark.parametrize("argv, message", [
    (["memory"], "config error: policy.name=digits has no shipped memory model"),
    (["memory", "policy.name=flux1", "--model", "flux3"], "config error: --model flux3 is not a shipped family"),
    (["memory", "--table", "policy.name=flux1"], "config error: --table predicts every shipped family"),
])
def test_a_bad_memory_command_is_one_line_with_exit_code_2(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_full_fine_tune_under_fsdp_on_8_gpus_shards_the_state_and_offload_removes_it():
    sizes = shipped_sizes()["flux1-dev"]
    one = MemoryPlan(checkpointing=True, parallel="none")
    eight = replace(one, gpus=8, parallel="fsdp")
    state = lambda plan: sum(predict(sizes, plan).items[k] for k in ("trainable weights (float32)", "optimizer state"))  # noqa: E731
    assert state(eight) == pytest.approx(state(one) / 8)
    offloaded = predict(sizes, replace(eight, offload="params")).items
    assert offloaded["trainable weights (float32)"] == offloaded["optimizer state"] == offloaded["gradients"] == 0
    assert predict(sizes, replace(eight, optimizer="adamw8bit")).items["optimizer state"] == pytest.approx(
        predict(sizes, eight).items["optimizer state"] / 4)


def test_train_warns_in_one_line_only_when_the_prediction_exceeds_the_gpu(capsys):
    p = memory.predict_config(_flux_lora())  # 24.8 GiB
    assert memory.too_big_note(p, 80.0) is None
    message = memory.too_big_note(p, 24.0)
    assert message.startswith("predicted peak 24.8 GiB per GPU (flux1-dev) exceeds this GPU's 24.0 GiB")
    assert "\n" not in message
    memory.warn_if_too_big(_flux_lora(), torch.device("cpu"), 1)  # CPU runs are skipped
    assert capsys.readouterr().err == ""
