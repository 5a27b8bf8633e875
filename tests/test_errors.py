"""Every bad input ends in one line on stderr that names the key or file and the fix, exit code 2, no traceback,
and (where the input allows it) before any model or weight is loaded."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flowgrove
from flowgrove import cli
from flowgrove.config.load import ConfigError, config_from_yaml_text, load_config
from flowgrove.training import setup as trainer_setup

SRC = str(Path(flowgrove.__file__).resolve().parents[1])
QUIET = ["run.progress=false"]


class ModelLoaded(Exception):
    """Raised by the patched model builders: a check ran too late."""


@pytest.fixture
def no_models(monkeypatch):
    """Fail loudly if a policy or reward model is built."""

    def refuse(*args, **kwargs):
        raise ModelLoaded("a model was loaded before the error")

    from flowgrove.training import prepare

    monkeypatch.setattr(trainer_setup, "prepare_policy", refuse)
    for target in (prepare, flowgrove.policies):
        monkeypatch.setattr(target, "build_policy", refuse)
    monkeypatch.setattr(trainer_setup, "build_reward", refuse)


def one_line_error(capsys, rc: int, *words: str) -> str:
    """The single stderr line of a failed command; it contains every one of ``words``."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and "ModelLoaded" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def train(tmp_path: Path, *args: str) -> int:
    return cli.main(["train", "--steps", "1", "--out", str(tmp_path / "run"), *QUIET, *args])


CASES = {
    "section set to a value": (["train=5"], ["train is a section", "train.steps="]),
    "section hidden by a later key": (["train=5", "train.lr=0.1"], ["train is a section"]),
    "list of the wrong length": (["train.betas=[0.9]"], ["train.betas", "exactly 2", "train.betas=[0.9,0.999]"]),
    "beta outside [0, 1)": (["train.betas=[0.9,1.5]"], ["train.betas", "[0, 1)"]),
    "malformed override value": (["train.betas=[0.9"], ["train.betas=[0.9", "line"]),
    "reward weight not a number": (["rewards.boldness=abc"], ["rewards.boldness", "not a number"]),
    "reward weight a bool": (["rewards={boldness: true}"], ["rewards.boldness", "not a number"]),
    "reward mapping without a space": (["rewards={contrast:1}"], ["rewards={contrast: 1}", "space after the colon"]),
    "all reward weights zero": (["rewards={boldness: 0, digit_classifier: 0.0}"], ["rewards", "nonzero"]),
    "unknown reward": (["rewards.boldnes=1"], ["rewards.boldnes", "did you mean 'boldness'"]),
    "timestep fraction zero": (["train.timestep_fraction=0"], ["train.timestep_fraction", "(0, 1]"]),
    "timestep fraction above one": (["train.timestep_fraction=1.5"], ["train.timestep_fraction", "(0, 1]"]),
    "window start beyond the last position": (["--method", "mixgrpo", "window.start=30"], ["window.start=30", "lower window.start"]),
    "window larger than the steps": (["--method", "mixgrpo", "window.size=40"], ["window.size=40"]),
    "split step out of range": (["--method", "branchgrpo", "tree.split_steps=[0,30]"], ["tree.split_steps", "sampler.num_steps=20"]),
    "split rounds out of range": (["--method", "branchgrpo", "tree.split_steps=[]", "tree.split_rounds=30"], ["tree.split_rounds=30"]),
    "width keep larger than the leaves": (["--method", "branchgrpo-widpru", "tree.width_keep=100"], ["tree.width_keep=100", "16 leaves"]),
    "adaptive call budget below the cheapest tree": (["--method", "branchgrpo-adaptive", "tree.adaptive_calls=50"],
                                                     ["tree.adaptive_calls=50", "78 calls", "raise it"]),
    "width keep larger than an adaptive tree's leaves": (["--method", "branchgrpo-adaptive", "tree.width_keep=16"],
                                                         ["tree.width_keep=16", "12 leaves", "tree.adaptive_calls=160"]),
    "tree advantages on chains": (["advantage.kind=backprop"], ["advantage.kind=backprop", "tree.enabled=true"]),
    "depth pruning out of range": (["--method", "branchgrpo-deppru", "tree.depth_pruning=[40]"], ["tree.depth_pruning"]),
    "first_k larger than the trainable steps": (["--method", "flowgrpo", "train.first_k=50"], ["train.first_k=50", "10 trainable"]),
    "one step with an x0_pred reward image": (["sampler.num_steps=1"], ["sampler.num_steps=1", "sampler.reward_image"]),
    "cps level above one": (["sampler.noise=cps", "sampler.noise_level=1.5"], ["sampler.noise_level=1.5", "[0, 1]"]),
    "cps split children above all the noise": (["--method", "branchgrpo", "sampler.noise=cps", "sampler.noise_level=0.8"],
                                               ["tree.split_noise_scale=4.0", "<= 1.05"]),
    "cps split at the last step": (["--method", "branchgrpo", "sampler.noise=cps", "tree.split_noise_scale=1",
                                    "tree.split_steps=[0,19]"], ["last step (19)", "tree.split_steps"]),
    "cps with the reference KL scale": (["--method", "flowgrpo-cps", "train.kl_beta=0.04", "train.kl_scale=reference"],
                                        ["train.kl_scale=reference", "train.kl_scale=exact"]),
    "first_k onto the noiseless last cps step": (["--method", "flowgrpo-cps", "train.first_k=10"],
                                                 ["train.first_k=10", "9 trainable", "noise=cps"]),
    "non-finite value": (["train.lr=inf"], ["train.lr", "finite"]),
    "the reference KL scale on a diffusion policy": (["--method", "dancegrpo-sd", "train.kl_beta=0.01", "train.kl_scale=reference"],
                                                     ["train.kl_scale=reference", "policy sd15", "train.kl_scale=exact"]),
    "the reference KL scale on sdxl": (["policy.name=sdxl", "train.kl_beta=0.01", "train.kl_scale=reference"],
                                       ["train.kl_scale=reference", "policy sdxl"]),
    "a value set to a mapping": (["train.lr={a: 1}"], ["train.lr", "one value"]),
    "unknown device": (["run.device=gpu0"], ["run.device='gpu0'"]),
    "sd3 grid with a window": (["--method", "mixgrpo", "sampler.schedule=sd3"], ["sampler.schedule=sd3", "sampler.schedule=flux"]),
    "std ddof as large as the groups": (["rollout.group_size=2", "advantage.ddof=2"], ["advantage.ddof=2", "rollout.group_size"]),
    "GRPO on deterministic steps": (["sampler.noise_level=0"], ["sampler.noise_level=0", "train.objective=nft"]),
    "forward objective on trees": (["--method", "branchgrpo", "train.objective=nft"], ["train.objective=nft", "tree.enabled=false"]),
    "forward objective on the plan's steps": (["--method", "mixgrpo", "train.objective=awm"], ["train.timesteps=plan", "random_fraction"]),
    "forward objective with the transition KL's scale": (["--method", "diffusionnft", "train.kl_scale=reference"], ["train.kl_scale=reference", "train.kl_beta"]),
    "nft beta zero": (["--method", "diffusionnft", "train.nft_beta=0"], ["train.nft_beta=0", "> 0"]),
    "awm clip range zero": (["--method", "awm", "train.clip_range=0"], ["train.clip_range=0", "> 0"]),
    "ODE rollouts with one noise per group": (["--method", "diffusionnft", "rollout.same_noise_in_group=true"], ["rollout.same_noise_in_group", "identical"]),
    "a quantised base for a full fine-tune": (["policy.quantize=int8"], ["policy.quantize=int8", "policy.lora_rank=0", "policy.quantize=none"]),
    "an unknown quantisation": (["policy.quantize=int4"], ["policy.quantize", "nf4"]),
    "a quantised base under FSDP2": (["policy.lora_rank=4", "policy.quantize=nf4", "run.parallel=fsdp"],
                                     ["policy.quantize=nf4", "run.parallel=fsdp", "FSDP2"]),
    "an optimizer-only offload": (["run.offload=optimizer"], ["run.offload=optimizer", "no optimizer-only", "run.offload=params"]),
    "a CPU offload without torchrun": (["run.offload=params"], ["run.offload=params", "torchrun --nproc-per-node=1"]),
    "a CPU offload under DDP": (["run.offload=params", "run.parallel=ddp"], ["run.offload=params", "run.parallel=ddp"]),
    "an unknown optimizer": (["train.optimizer=adam8"], ["train.optimizer", "adamw8bit"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_one_line_before_any_model(tmp_path, capsys, no_models, case):
    args, words = CASES[case]
    one_line_error(capsys, train(tmp_path, *args), *words)
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_names_run_device(tmp_path, capsys, no_models):
    line = one_line_error(capsys, train(tmp_path, "run.device=cuda"), "run.device='cuda'", "run.device=cpu")
    assert "CUDA" in line


def test_default_device_is_auto_and_resolves_to_the_cpu_without_cuda():
    from flowgrove.parallel.distributed import resolve_device

    assert load_config().run.device == "auto"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


def test_malformed_yaml_names_file_line_and_column(tmp_path, capsys, no_models):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {lr: 1\n  x: [\n")
    one_line_error(capsys, train(tmp_path, str(path)), "bad.yaml", "line 2, column 4")
    path.write_text("train:\n  lr: 1\n\tsteps: 3\n")
    one_line_error(capsys, train(tmp_path, str(path)), "bad.yaml", "line 3, column 1", "tab")


@pytest.mark.parametrize("text, words", [
    ("- 1\n- 2\n", ["must be a mapping"]),
    ("5\n", ["must be a mapping"]),
    ("rewards: {boldness: fast}\n", ["rewards.boldness"]),
    ("train: 5\n", ["train is a section"]),
    ("sampler: {num_steps: 1}\n", ["sampler.num_steps=1"]),
])
def test_bad_config_file_is_one_line(tmp_path, capsys, no_models, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    one_line_error(capsys, train(tmp_path, str(path)), *words)


def test_config_file_that_is_not_text_or_missing(tmp_path, capsys, no_models):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    one_line_error(capsys, train(tmp_path, str(path)), "c.yaml", "UTF-8")
    one_line_error(capsys, train(tmp_path, str(tmp_path / "missing.yaml")), "missing.yaml", "does not exist")
    one_line_error(capsys, train(tmp_path, str(tmp_path)), "does not exist or is a folder")


def test_corrupt_checkpoint_config_names_the_file():
    with pytest.raises(ConfigError, match=r"^run/checkpoints/step_000001/config.yaml is not valid YAML.*line 2, column 1"):
        config_from_yaml_text("train: {lr: [", source="run/checkpoints/step_000001/config.yaml")
    with pytest.raises(ConfigError, match=r"^saved.yaml: train.betas"):
        config_from_yaml_text("train: {betas: [0.9]}", source="saved.yaml")


def test_checkpoint_error_is_one_line(tmp_path, capsys, monkeypatch):
    from flowgrove.recipes import train as runner

    class CheckpointError(ValueError):
        pass

    def corrupt(*args, **kwargs):
        raise CheckpointError(f"{tmp_path}/checkpoints/step_000002/optimizer.pt is truncated or corrupt;\n"
                              "resume from an older checkpoint with --checkpoint step_N")

    monkeypatch.setattr(runner, "resume", corrupt)
    one_line_error(capsys, cli.main(["train", "--resume", str(tmp_path)]), "optimizer.pt", "--checkpoint")


def test_read_only_output_disk_names_the_path(tmp_path, capsys, no_models, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    one_line_error(capsys, train(tmp_path), str(tmp_path / "run"), "read-only", "--out")


def test_full_output_disk_names_the_path(tmp_path, capsys, no_models, monkeypatch):
    write_text = Path.write_text

    def full(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    one_line_error(capsys, train(tmp_path), str(tmp_path / "run"), "disk is full", "--out")


def test_wrapped_disk_errors_are_one_line():
    line = cli.error_message(RuntimeError("[enforce fail at inline_container.cc:603] .\nPytorchStreamWriter failed "
                                          "writing file data/0: file write failed"))
    assert "\n" not in line and "free disk space" in line
    line = cli.error_message(RuntimeError("boom\nsecond line"))
    assert line == "flowgrove: internal error: RuntimeError: boom second line (a bug: rerun with --debug and report the traceback)"


def test_sample_n_zero_names_n(capsys, no_models):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sample", "--n", "0"])
    assert exit_info.value.code == 2
    one_line_error(capsys, 2, "--n", "1 or more")


def test_sample_out_folder_missing(tmp_path, capsys, no_models):
    one_line_error(capsys, cli.main(["sample", "--out", str(tmp_path / "no" / "s.png")]), "--out", "does not exist")


def test_usage_errors_are_one_line(capsys):
    for argv in (["bogus"], ["train", "--steps", "many"], ["--debug", "train", "--nope"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        one_line_error(capsys, 2, "error")


def test_interrupt_reaching_main_is_one_line(tmp_path, capsys, monkeypatch):
    from flowgrove.recipes import train as runner

    run = tmp_path / "run"

    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train", interrupted)
    one_line_error(capsys, train(tmp_path), "interrupted", "nothing was written")
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000001")
    one_line_error(capsys, train(tmp_path), "interrupted", f"the last checkpoint in {run} stays valid", f"--resume {run}")


def test_debug_after_the_subcommand_reraises(tmp_path, no_models):
    with pytest.raises(ConfigError, match="train is a section"):
        cli.main(["train", "train=5", "--debug"])
    with pytest.raises(ConfigError, match="train is a section"):
        cli.main(["--debug", "train", "train=5"])


def run_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "flowgrove", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_debug_shows_the_traceback():
    proc = run_cli("--debug", "train", "train=5")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" in err and "train is a section" in err


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """SIGINT while the CLI reads its config file: the config is a FIFO, so the signal lands in start-up for sure."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    proc = run_cli("train", str(fifo), "--out", str(tmp_path / "run"))
    with open(fifo, "w"):  # returns once the CLI has opened the config for reading
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "interrupted" in lines[0] and "nothing was written" in lines[0]
    assert not (tmp_path / "run").exists()


def test_reward_sets_replace_and_dotted_weights_patch(tmp_path):
    assert load_config(None, ["rewards={contrast: 1}"]).rewards == {"contrast": 1.0}
    assert load_config(None, ["rewards.contrast=0.5"]).rewards == {"digit_classifier": 0.5, "boldness": 0.5, "contrast": 0.5}
    assert load_config(None, ["rewards={contrast: 1}", "rewards.boldness=2"]).rewards == {"contrast": 1.0, "boldness": 2.0}
    path = tmp_path / "c.yaml"
    path.write_text("rewards: {brightness: 1.0}\n")
    assert load_config(path).rewards == {"brightness": 1.0}
    assert load_config(path, ["rewards.contrast=1"]).rewards == {"brightness": 1.0, "contrast": 1.0}


def test_digit_classifier_names_itself_and_its_prompts():
    from flowgrove.rewards import build_reward

    reward = build_reward("digit_classifier")
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"reward digit_classifier: .*'a cat'.*'a handwritten zero'.*'a handwritten nine'"):
        reward(images, ["a handwritten seven", "a cat"])
    assert reward(images, ["a handwritten seven", "A handwritten  one"]).shape == (2,)


def test_sample_grids_upscale_only_tiny_images(tmp_path):
    from PIL import Image

    from flowgrove.runs.metrics import GRID_MAX_SIDE, grid_layout, save_grid

    digits = grid_layout(16, 8, 8, columns=8)
    assert digits.scale == 8 and (digits.width, digits.height) == ((8 * 9 + 1) * 8, (2 * 9 + 1) * 8)
    large = grid_layout(16, 512, 512, columns=8)  # two prompts of 512-px images: 32840 x 8216 before
    assert large.scale == 1 and max(large.width, large.height) <= GRID_MAX_SIDE
    assert grid_layout(4, 64, 64, columns=8).columns == 4
    save_grid(torch.rand(6, 3, 96, 96), tmp_path / "g.png", columns=3)
    assert Image.open(tmp_path / "g.png").size == (3 * 97 + 1, 2 * 97 + 1)
    with pytest.raises(ValueError, match="at least one image"):
        grid_layout(0, 8, 8, columns=1)


def test_os_errors_name_the_path():
    assert cli.error_message(FileNotFoundError(errno.ENOENT, "No such file or directory", "w.safetensors")) == (
        "flowgrove: error: w.safetensors: No such file or directory; check the path")
    line = cli.error_message(PermissionError(errno.EACCES, "Permission denied", "/runs/x"))
    assert line.startswith("flowgrove: cannot access /runs/x: permission denied") and "--out" in line
    assert cli.error_message(FileExistsError("runs/x already holds a run; continue it")) == (
        "flowgrove: error: runs/x already holds a run; continue it")


@pytest.mark.parametrize("args, word", [(["--checkpoint", "step_1"], "--resume"), (["--resume", "x", "--overwrite"], "--overwrite")])
def test_checkpoint_and_overwrite_flags_need_the_right_mode(args, word, capsys, no_models):
    one_line_error(capsys, cli.main(["train", *args]), word)


def test_reward_options_reach_the_factory_and_name_their_reward(tmp_path, capsys):
    from flowgrove.rewards.base import register_reward

    seen = {}

    @register_reward("options_probe")
    def probe(device=None, scale=1.0):
        seen["scale"] = scale
        return lambda images, prompts: images.mean(dim=(1, 2, 3)) * scale

    cfg = load_config(None, ["rewards={options_probe: 1.0}", "reward_options.options_probe.scale=3.0"])
    trainer_setup.build_trainer(cfg)
    assert seen["scale"] == 3.0
    one_line_error(capsys, train(tmp_path, "reward_options.contrast.x=1"), "reward_options.contrast", "rewards.contrast=WEIGHT")


def test_a_note_is_said_once_under_torchrun_by_rank_zero(monkeypatch, capsys):
    from flowgrove.messages import note

    for rank, said in (("0", True), ("1", False), ("3", False)):
        monkeypatch.setenv("RANK", rank)
        note("the run resumes from step 4")
        assert ("flowgrove: the run resumes from step 4" in capsys.readouterr().err) is said
    monkeypatch.delenv("RANK")
    note("one process")
    assert capsys.readouterr().err == "flowgrove: one process\n"
