"""The flux2 policy: tiny diffusers Flux2KleinPipeline and Flux2Pipeline folders (diffusers' own test configs, text
encoders deep enough for the layers the pipelines read) saved, loaded and sampled."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from flowgrove.policies import build_policy  # noqa: E402
from flowgrove.samplers import sample_euler  # noqa: E402
from flowgrove.samplers.schedules import flux_sigmas  # noqa: E402

PROMPTS = ["a cat", "a big red dog"]
SIDE = 16  # latents (4, 8, 8) with the one-block VAE (scale 1): 64 image tokens
TOKENS = {"klein": 64, "dev": 256}  # max_sequence_length: [dev]'s system prompt alone is 168 byte tokens
# Qwen3's chat turn and empty thinking block (what Flux2KleinPipeline renders with enable_thinking=False)
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
                  "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
# Mistral Small 3.1's layout: BOS, then the system prompt and the user turn (content as a list of text parts)
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
                    "{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]{% else %}[INST]{{ m['content'][0]['text'] }}[/INST]"
                    "{% endif %}{% endfor %}")


def _byte_level_tokenizer(specials, **kwargs):
    """A byte-level BPE tokenizer without merges (one token per byte) plus ``specials``, built in code."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in ("<|endoftext|>", *specials):
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], **kwargs)


def _tiny_parts(guidance_embeds: bool):
    """diffusers ``tests/pipelines/flux2`` transformer (text width 48 = 3 stacked layers of 16) and VAE."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=guidance_embeds)
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                             latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():  # a batch norm that is not the identity, so decoding must undo it
        vae.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, 4))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 4))
    # FLUX.1 / FLUX.2's shipped scheduler settings: dynamic shifting, so the pipelines' mu applies
    return dict(transformer=transformer, vae=vae,
                scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0))


def save_tiny_klein(path) -> None:
    """FLUX.2 [klein]: no guidance embedding, a 27-layer Qwen3 (the pipeline reads layers 9/18/27)."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    parts = _tiny_parts(guidance_embeds=False)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(intermediate_size=16, hidden_size=16, num_hidden_layers=27,
                                                num_attention_heads=2, num_key_value_heads=2, vocab_size=300,
                                                max_position_embeddings=512)).eval()
    tokenizer = _byte_level_tokenizer(("<|im_start|>", "<|im_end|>"), chat_template=QWEN3_TEMPLATE)
    Flux2KleinPipeline(text_encoder=text_encoder, tokenizer=tokenizer, **parts).save_pretrained(str(path))


def save_tiny_dev(path) -> None:
    """FLUX.2 [dev]: the guidance embedding, a 30-layer Mistral-3 (layers 10/20/30); ``model_index.json`` names
    the ``PixtralProcessor`` as the real folder does, its ``tokenizer/`` holds the tokenizer and chat template."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    parts = _tiny_parts(guidance_embeds=True)
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": 300, "hidden_size": 16, "intermediate_size": 37,
                     "max_position_embeddings": 512, "num_attention_heads": 4, "num_hidden_layers": 30,
                     "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 1e9, "sliding_window": None},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "intermediate_size": 37, "image_size": 30, "patch_size": 6, "num_channels": 3},
        image_seq_length=4, vision_feature_layer=-1, image_token_index=1)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    tokenizer = _byte_level_tokenizer(("<s>", "[IMG]", "[IMG_BREAK]", "[IMG_END]"), bos_token="<s>",
                                      chat_template=MISTRAL_TEMPLATE)
    Flux2Pipeline(text_encoder=text_encoder, tokenizer=tokenizer, **parts).save_pretrained(str(path))
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "PixtralProcessor"]}))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    paths = {"klein": tmp_path_factory.mktemp("tiny_flux2_klein"), "dev": tmp_path_factory.mktemp("tiny_flux2_dev")}
    save_tiny_klein(paths["klein"])
    save_tiny_dev(paths["dev"])
    return paths


def _policy(folders, variant, **options):
    options = {"height": SIDE, "width": SIDE, "max_sequence_length": TOKENS[variant], **options}
    return build_policy("flux2", path=str(folders[variant]), dtype="float32", **options)


@pytest.mark.parametrize("variant, guidance_scale", [("klein", 1.0), ("klein", 4.0), ("dev", 2.5)])
def test_flux2_policy_reproduces_the_pipeline(folders, variant, guidance_scale):
    from flowgrove.policies.flux2 import flux2_shift

    policy = _policy(folders, variant, guidance_scale=guidance_scale)
    assert policy.latent_shape == (4, 8, 8)  # in_channels 4 = 1 VAE channel x 2x2 patch; 16 px / (2 x scale 1)
    x1 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = policy.pipe(prompt=PROMPTS, height=SIDE, width=SIDE, num_inference_steps=3,
                          guidance_scale=guidance_scale, max_sequence_length=TOKENS[variant],
                          latents=x1, output_type="pt").images
        sigmas = flux_sigmas(3, flux2_shift(policy.pipe.scheduler.config, 64, 3))  # flowgrove's grid
        torch.testing.assert_close(sigmas, policy.pipe.scheduler.sigmas, atol=1e-6, rtol=0)  # the pipeline's mu
        cond = policy.encode_prompts(PROMPTS)
        ours = policy.decode(sample_euler(lambda x, s: policy.velocity(x, s, cond), x1, sigmas))
    assert cond.prompt_embeds.shape == (2, TOKENS[variant], 48)
    assert ours.shape == ref.shape == (2, 3, SIDE, SIDE)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_a_step_distilled_klein_ignores_guidance_scale_as_its_pipeline_does(folders, tmp_path):
    import shutil

    shutil.copytree(folders["klein"], tmp_path / "distilled")
    index = json.loads((tmp_path / "distilled" / "model_index.json").read_text())
    (tmp_path / "distilled" / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    distilled = build_policy("flux2", path=str(tmp_path / "distilled"), dtype="float32", height=SIDE, width=SIDE,
                             max_sequence_length=TOKENS["klein"], guidance_scale=4.0)
    base, plain = _policy(folders, "klein", guidance_scale=4.0), _policy(folders, "klein", guidance_scale=1.0)
    x = torch.randn(2, *base.latent_shape, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.9, 0.5])
    with torch.no_grad():
        v = {name: p.velocity(x, sigma, p.encode_prompts(PROMPTS)) for name, p in
             (("distilled", distilled), ("base", base), ("plain", plain))}
    torch.testing.assert_close(v["distilled"], v["plain"], atol=1e-6, rtol=0)  # one forward, no CFG
    assert (v["base"] - v["plain"]).abs().max() > 1e-3  # the base model's CFG changes the velocity


def test_flux2_folder_errors_say_what_to_do(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download black-forest-labs/FLUX.2"):
        build_policy("flux2", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="dtype"):
        build_policy("flux2", path=str(folders["klein"]), dtype="float8")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match=r"^policy.path: .* holds a FluxPipeline folder, but flux2 loads "
                                         r"Flux2Pipeline or Flux2KleinPipeline"):
        build_policy("flux2", path=str(tmp_path))


def test_a_pixtral_tokenizer_without_bos_in_its_template_is_refused(folders, tmp_path):
    import shutil

    from flowgrove.policies.flux2 import text_tokenizer

    folder = tmp_path / "dev"
    shutil.copytree(folders["dev"] / "tokenizer", folder / "tokenizer")
    shutil.copy(folders["dev"] / "model_index.json", folder)
    assert text_tokenizer(folder).bos_token == "<s>"
    (folder / "tokenizer" / "chat_template.jinja").write_text(MISTRAL_TEMPLATE.replace("{{ bos_token }}", ""))
    with pytest.raises(ValueError, match="chat template does not start with the BOS token"):
        text_tokenizer(folder)


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_flux2_passes_the_shared_adapter_contract(folders, variant):
    from adapter_contract import check_policy_contract

    check_policy_contract(_policy(folders, variant), PROMPTS)  # [klein] with CFG (guidance_scale 4)


@pytest.mark.parametrize("variant", ["klein", "dev"])
@pytest.mark.parametrize("kind", ["tree-lora", "window-full"])
def test_flux2_tree_and_window_presets_train_and_export(folders, tmp_path, variant, kind):
    from adapter_contract import TREE, WINDOW, check_full_export, check_pipeline_lora_export, train_and_export
    from diffusers import Flux2Transformer2DModel
    from safetensors import safe_open

    from flowgrove.runs.export import LORA_FILE

    args = ["policy.name=flux2", f"policy.path={folders[variant]}",
            f"policy.options={{height: {SIDE}, width: {SIDE}, max_sequence_length: {TOKENS[variant]}}}"]
    if kind == "tree-lora":
        targets = "policy.lora_targets=[to_q,to_k,to_v,to_out.0,to_qkv_mlp_proj]"  # single-stream blocks too
        run, out = train_and_export(tmp_path, TREE, [*args, "policy.lora_rank=4", targets], "brightness")
        with safe_open(str(out / LORA_FILE), framework="pt") as f:
            assert any("single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B" in k for k in f.keys())
        check_pipeline_lora_export(run, out, _policy(folders, variant), PROMPTS, atol=1e-6)
    else:
        run, out = train_and_export(tmp_path, WINDOW, [*args, "policy.lora_rank=0"], "brightness")
        check_full_export(run, out, Flux2Transformer2DModel)
