"""Sizes a family's pipeline would round (``policy.options.height=17`` becoming 16) are refused in one line that
names the option and the nearest valid values, from the folder's config files before any weights load: every
folder here holds configs only, as the real models' (FLUX.1, FLUX.2, SD3, SD1.5, SDXL, Qwen-Image, Wan 2.1,
HunyuanVideo, Z-Image)."""

from __future__ import annotations

import json

import pytest

from flowgrove import cli
from flowgrove.messages import ConfigError
from flowgrove.policies import build_policy

pytest.importorskip("diffusers")

SD_VAE = ("AutoencoderKL", {"block_out_channels": [128, 256, 512, 512]})  # VAE scale 8
# family -> pipeline class, {component: (class, config beyond the class defaults)}, side multiple, frame step
FOLDERS = {
    "flux1": ("FluxPipeline", {"vae": SD_VAE}, 16, 0),
    "flux2": ("Flux2KleinPipeline", {"vae": ("AutoencoderKLFlux2", {})}, 16, 0),  # the class's defaults: VAE scale 8
    "sd3": ("StableDiffusion3Pipeline", {"vae": SD_VAE, "transformer": ("SD3Transformer2DModel", {"patch_size": 2})},
            16, 0),
    "sd15": ("StableDiffusionPipeline", {"vae": SD_VAE}, 8, 0),
    "sdxl": ("StableDiffusionXLPipeline", {"vae": SD_VAE}, 8, 0),
    "qwen_image": ("QwenImagePipeline", {"vae": ("AutoencoderKLQwenImage", {})}, 16, 0),
    "wan": ("WanPipeline", {"vae": ("AutoencoderKLWan", {}), "transformer": ("WanTransformer3DModel", {})}, 16, 4),
    "hunyuan_video": ("HunyuanVideoPipeline", {"vae": ("AutoencoderKLHunyuanVideo", {})}, 16, 4),
    "z_image": ("ZImagePipeline", {"vae": SD_VAE}, 16, 0),
}


def config_only_folder(path, family: str):
    """A diffusers folder of ``family`` with ``model_index.json`` and its components' ``config.json`` only."""
    pipeline, components, _, _ = FOLDERS[family]
    index = {"_class_name": pipeline, **{name: ["diffusers", cls] for name, (cls, _) in components.items()}}
    (path / "model_index.json").write_text(json.dumps(index))
    for name, (cls, config) in components.items():
        (path / name).mkdir()
        (path / name / "config.json").write_text(json.dumps({"_class_name": cls, **config}))
    return path


@pytest.mark.parametrize("family", sorted(FOLDERS))
def test_a_size_the_pipeline_would_round_is_refused_before_any_weights_load(tmp_path, family):
    folder, (_, _, side, frames) = str(config_only_folder(tmp_path, family)), FOLDERS[family]
    video = {"num_frames": 1 + frames} if frames else {}
    with pytest.raises(ConfigError, match=rf"^policy.options.height=17 is not a multiple of {side} \({family}: .*\); "
                                          rf"set policy.options.height=16 or {16 + side}$"):
        build_policy(family, path=folder, height=17, width=16, **video)
    with pytest.raises(ConfigError, match=rf"policy.options.width=5 .* set policy.options.width={side}$"):
        build_policy(family, path=folder, height=16, width=5, **video)
    if frames:
        with pytest.raises(ConfigError, match=rf"^policy.options.num_frames=6 is not 1 \+ {frames} \* k .* "
                                              rf"set policy.options.num_frames=5 or 9$"):
            build_policy(family, path=folder, height=16, width=16, num_frames=6)


def test_the_cli_refuses_height_17_in_one_line(tmp_path, capsys):
    (tmp_path / "flux").mkdir()
    folder = config_only_folder(tmp_path / "flux", "flux1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    rc = cli.main(["train", "--steps", "1", "--out", str(tmp_path / "run"), "run.progress=false", "run.device=cpu",
                   "policy.name=flux1", f"policy.path={folder}", f"data.train={prompts}", "rewards={brightness: 1.0}",
                   "policy.options={height: 17, width: 16}"])
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("[transformers]")]  # this machine's missing torchvision, on the first import
    assert rc == 2 and err == ["flowgrove: config error: policy.options.height=17 is not a multiple of 16 (flux1: VAE "
                               "scale 8 x 2x2 latent patches); set policy.options.height=16 or 32"], err
