"""`flowgrove export`: LoRA and full fine-tunes of tiny FLUX runs load back into diffusers and reproduce training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flowgrove.cli import main
from flowgrove.config.load import config_from_yaml_text
from flowgrove.policies.base import Conditioning
from flowgrove.policies.flux import FluxAdapter
from adapter_contract import run_trainer as _trained
from test_policies import _save_tiny_flux_pipeline

TINY = ["rollout.prompts_per_step=1", "rollout.group_size=2", "sampler.num_steps=3", "eval.num_steps=3",
        "eval.samples_per_prompt=1", "run.progress=false", "train.lr=1e-2", "run.checkpoint_every=1"]


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    """A saved tiny FluxPipeline folder and a prompt file."""
    root = tmp_path_factory.mktemp("flux")
    _save_tiny_flux_pipeline(root / "pipe")
    (root / "prompts.txt").write_text("a cat\na dog\n")
    return root


def _train_flux(root, name: str, rank: int, extra: tuple[str, ...] = ()):
    run = root / name
    args = ["train", "--steps", "2", "--out", str(run), "policy.name=flux1", f"policy.path={root / 'pipe'}",
            "policy.dtype=float32", "policy.options={height: 16, width: 16, max_sequence_length: 8}",
            f"policy.lora_rank={rank}", "rewards={brightness: 1.0}", f"data.train={root / 'prompts.txt'}", *TINY, *extra]
    assert main(args) == 0
    return run


@pytest.fixture(scope="module")
def flux_lora_run(flux_base):
    return _train_flux(flux_base, "lora", 4)


@pytest.fixture(scope="module")
def digits_lora_ema_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits") / "lora"
    assert main(["train", "--steps", "2", "--out", str(run), "policy.lora_rank=4", "train.ema_decay=0.5", *TINY]) == 0
    return run


def _inputs(latent_shape, cond_dims, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *latent_shape, generator=g)
    tokens, dim = cond_dims
    cond = Conditioning(torch.randn(2, tokens, dim, generator=g), torch.randn(2, dim, generator=g))
    return x, torch.tensor([0.9, 0.4]), cond


@torch.no_grad()
def _velocity(transformer, x, sigma, cond):
    return FluxAdapter(transformer.eval(), None).velocity(x, sigma, cond)


def _keys(file):
    with safe_open(str(file), "pt") as f:
        return list(f.keys()), f.metadata()


# ---- LoRA ---------------------------------------------------------------------------------------------


def test_flux_lora_export_loads_with_load_lora_weights(flux_base, flux_lora_run, tmp_path, capsys):
    from diffusers import FluxPipeline

    out = tmp_path / "lora"
    assert main(["export", str(flux_lora_run), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    keys, metadata = _keys(out / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert not any(".default." in k for k in keys)
    lora_config = json.loads(metadata["lora_adapter_metadata"])  # FluxPipeline.save_lora_weights: prefixed keys
    assert lora_config["transformer.r"] == lora_config["transformer.lora_alpha"] == 4  # alpha / r folded into lora_B
    info = json.loads((out / "flowgrove_export.json").read_text())
    assert info["kind"] == "lora" and info["lora_rank"] == 4 and info["lora_alpha"] == 8 and not info["ema"]

    pipe = FluxPipeline.from_pretrained(str(flux_base / "pipe"))
    x, sigma, cond = _inputs((1, 16, 16), (8, 32))
    base = _velocity(pipe.transformer, x, sigma, cond)
    pipe.load_lora_weights(str(out))  # the default adapter scale
    trainer = _trained(flux_lora_run)
    ours = trainer.policy.velocity(x, sigma, cond)
    assert (ours - base).abs().max() > 1e-3  # the LoRA moved, so the comparison means something
    torch.testing.assert_close(_velocity(pipe.transformer, x, sigma, cond), ours, atol=1e-5, rtol=0)
    pipe.unload_lora_weights()  # a loader that ignores the metadata infers alpha = r: the same output
    pipe.load_lora_weights(load_file(str(out / "pytorch_lora_weights.safetensors")))
    torch.testing.assert_close(_velocity(pipe.transformer, x, sigma, cond), ours, atol=1e-5, rtol=0)


def test_export_takes_the_named_checkpoint(flux_lora_run, tmp_path):
    first, last = tmp_path / "s1", tmp_path / "s2"
    assert main(["export", str(flux_lora_run), "--checkpoint", "step_1", "--out", str(first)]) == 0
    assert main(["export", str(flux_lora_run), "--out", str(last)]) == 0
    assert json.loads((first / "flowgrove_export.json").read_text())["checkpoint"] == "step_000001"
    assert json.loads((last / "flowgrove_export.json").read_text())["iteration"] == 2
    a, b = ((d / "pytorch_lora_weights.safetensors").read_bytes() for d in (first, last))
    assert a != b


def test_digits_lora_export_default_is_ema_and_differs_from_raw(digits_lora_ema_run, tmp_path):
    from flowgrove.policies.digits import build_digits_policy

    outs = {flag: tmp_path / (flag.strip("-") or "default") for flag in ("", "--ema", "--no-ema")}
    for flag, out in outs.items():
        assert main(["export", str(digits_lora_ema_run), "--out", str(out), *([flag] if flag else [])]) == 0
    assert json.loads((outs[""] / "flowgrove_export.json").read_text())["ema"] is True
    trainer = _trained(digits_lora_ema_run)
    x, sigma, cond = _inputs((1, 8, 8), (5, 32))
    expected = {"--no-ema": trainer.policy.velocity(x, sigma, cond)}
    with trainer.weights_swapped(trainer.ema):
        expected["--ema"] = expected[""] = trainer.policy.velocity(x, sigma, cond)
    assert (expected["--ema"] - expected["--no-ema"]).abs().max() > 1e-4  # the EMA differs from the raw weights
    for flag, out in outs.items():
        transformer = build_digits_policy().module
        transformer.load_lora_adapter(str(out), prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
        torch.testing.assert_close(_velocity(transformer, x, sigma, cond), expected[flag], atol=1e-5, rtol=0)


# ---- full fine-tunes -----------------------------------------------------------------------------------


def _trained_weights(trainer):
    return {n: p.detach() for n, p in trainer.policy.module.named_parameters()}


def test_flux_full_export_is_a_pipeline_folder(flux_base, tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    run = _train_flux(flux_base, "full", 0)
    out = tmp_path / "full"
    assert main(["export", str(run), "--out", str(out)]) == 0
    trainer = _trained(run)
    loaded = FluxTransformer2DModel.from_pretrained(str(out), subfolder="transformer")
    trained = _trained_weights(trainer)
    state = loaded.state_dict()
    assert state.keys() == trained.keys() and all(torch.equal(state[n], t) for n, t in trained.items())
    pipe = FluxPipeline.from_pretrained(str(out))
    x, sigma, cond = _inputs((1, 16, 16), (8, 32))
    torch.testing.assert_close(_velocity(pipe.transformer, x, sigma, cond), trainer.policy.velocity(x, sigma, cond),
                               atol=1e-5, rtol=0)


def test_digits_full_export_is_a_transformer_folder(tmp_path):
    from diffusers import FluxTransformer2DModel

    run = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out", str(run), *TINY]) == 0
    out = tmp_path / "full"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert (out / "config.json").is_file()
    state = FluxTransformer2DModel.from_pretrained(str(out)).state_dict()
    trained = _trained_weights(_trained(run))
    assert state.keys() == trained.keys() and all(torch.equal(state[n], t) for n, t in trained.items())


# ---- errors --------------------------------------------------------------------------------------------


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for word in words:
        assert word in err[0], err[0]


def test_export_errors_are_one_line(flux_lora_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "o1")]) == 2
    _one_line_error(capsys, "no checkpoint")
    assert main(["export", str(flux_lora_run), "--ema", "--out", str(tmp_path / "o2")]) == 2
    _one_line_error(capsys, "--ema", "train.ema_decay=0")
    assert main(["export", str(flux_lora_run), "--checkpoint", "step_7", "--out", str(tmp_path / "o3")]) == 2
    _one_line_error(capsys, "step_7", "step_000002")
    used = tmp_path / "used"
    used.mkdir()
    (used / "x.txt").write_text("keep")
    assert main(["export", str(flux_lora_run), "--out", str(used)]) == 2
    _one_line_error(capsys, "not empty", "--overwrite")
    assert (used / "x.txt").is_file()
    assert main(["export", str(flux_lora_run), "--out", str(used), "--overwrite"]) == 0
    assert not (used / "x.txt").exists() and (used / "pytorch_lora_weights.safetensors").is_file()


def test_damaged_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(run), *TINY]) == 0
    (run / "checkpoints" / "step_000001" / "dcp" / "__0_0.distcp").write_bytes(b"broken")
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "no intact checkpoint")
    assert not (tmp_path / "o").exists()


# ---- the model card ------------------------------------------------------------------------------------


def test_lora_export_has_a_hugging_face_model_card(flux_base, flux_lora_run, tmp_path):
    from adapter_contract import read_card

    from flowgrove import __version__

    out = tmp_path / "card"
    assert main(["export", str(flux_lora_run), "--out", str(out)]) == 0
    meta, body = read_card(out)
    assert meta["base_model"] == str(flux_base / "pipe") and meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image"
    assert {"flowgrove", "grpo", "lora", "dancegrpo", "flux1"} <= set(meta["tags"])
    assert "- Method: `dancegrpo` (DanceGRPO" in body and "| `brightness` | 1 |" in body
    assert "LoRA rank 4, alpha 8" in body and "- Steps: 2 of 2 (checkpoint `step_000002`, raw weights)" in body
    summary = json.loads((flux_lora_run / "summary.json").read_text())
    assert f"| reward | {summary['heldout_reward_before']:.4g} | {summary['heldout_reward_after']:.4g} |" in body
    assert f"flowgrove {__version__}" in body and "pipe.load_lora_weights(" in body
    config = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    saved = (flux_lora_run / "checkpoints" / "step_000002" / "config.yaml").read_text()
    assert config.strip() == saved.strip() and config_from_yaml_text(config).policy.lora_rank == 4


def test_model_card_of_an_unfinished_full_run_says_so(tmp_path):
    from adapter_contract import read_card

    run = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(run), *TINY]) == 0
    (run / "summary.json").unlink()  # as a run stopped before its final evaluation
    assert main(["export", str(run), "--out", str(tmp_path / "full")]) == 0
    meta, body = read_card(tmp_path / "full")
    assert "base_model" not in meta and "lora" not in meta["tags"]  # the built-in digits weights: no base folder
    assert "no held-out results" in body and "full fine-tune" in body
    assert "FluxTransformer2DModel.from_pretrained(" in body


def test_export_of_a_sharded_checkpoint_writes_what_the_trainer_state_gives(tmp_path, monkeypatch):
    # The files equal those written from the live trainer's tensors copied into the policy by name (what the
    # single-file checkpoints exported), for the EMA and the raw weights.
    from flowgrove.config.load import config_to_yaml, load_config
    from flowgrove.runs import export
    from flowgrove.runs.checkpoint import save_checkpoint
    from flowgrove.training.prepare import prepare_policy
    from flowgrove.training.setup import build_trainer

    cfg = load_config(None, [*TINY, "policy.lora_rank=4", "train.ema_decay=0.5", "train.steps=1"])
    trainer = build_trainer(cfg)
    trainer.step()
    save_checkpoint(trainer.state(), tmp_path / "run", config_to_yaml(cfg))
    names = [n for n, p in trainer.policy.module.named_parameters() if p.requires_grad]

    def direct(cfg, path, ema):
        policy = prepare_policy(cfg, torch.device("cpu"))
        params = dict(policy.module.named_parameters())
        with torch.no_grad():
            for name, value in zip(names, trainer.ema if ema else trainer.params):
                params[name].copy_(value)
        return policy

    for ema in (True, False):
        out, files = tmp_path / "out", []  # one path for both: the model card names it
        for load in (export.load_trained_policy, direct):
            with monkeypatch.context() as m:
                m.setattr(export, "load_trained_policy", load)
                export.export_run(tmp_path / "run", out, ema=ema, overwrite=True)
            files.append({f.relative_to(out): _content(f) for f in out.rglob("*") if f.is_file()})
        assert files[0].keys() == files[1].keys()
        for name, content in files[0].items():
            assert content == files[1][name], name


def _content(file) -> object:
    """A file's bytes; for safetensors its tensors' bytes and its metadata (whose order in the header varies)."""
    if file.suffix != ".safetensors":
        return file.read_bytes()
    with safe_open(str(file), "pt") as f:
        return f.metadata(), {k: (f.get_tensor(k).dtype, f.get_tensor(k).numpy().tobytes()) for k in f.keys()}
