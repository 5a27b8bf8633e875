"""The run's preflight: every error a config, a file, a reward option or a reward server can cause comes before any
pipeline component loads, as one line with exit code 2, and leaves no run folder behind."""

from __future__ import annotations

import importlib
import logging
import socket
from pathlib import Path

import pytest

from flowgrove import cli
from flowgrove.config.load import load_config
from flowgrove.parallel.distributed import check_launcher_env
from flowgrove.rewards.base import check_reward_options
from flowgrove.training import prepare, setup
from flowgrove.training.preflight import preflight

QUIET = ["run.progress=false", "--steps", "1"]
FAMILIES = ("flux", "sd3", "sd15", "sdxl", "wan", "hunyuan_video", "qwen_image")  # the diffusers folders


class Loaded(Exception):
    """A model, pipeline or reward model was loaded: a check came too late."""


@pytest.fixture
def nothing_loads(monkeypatch):
    """Every way to a model refuses: the pipeline loader (each diffusers family goes through it), the policy
    builders and the reward builder of the trainer."""

    def refuse(*args, **kwargs):
        raise Loaded("loaded before the error")

    for family in FAMILIES:
        monkeypatch.setattr(importlib.import_module(f"flowgrove.policies.{family}"), "load_local_pipeline", refuse)
    for module in (prepare, setup):
        for name in ("build_policy", "prepare_policy", "build_reward"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: nothing listens there


def pipeline_folder(tmp_path: Path) -> str:
    """A folder that passes the folder check (a model_index.json): only a load would find it is not a model."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    return str(folder)


def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {"missing": tmp_path / "nope.txt", "empty": tmp_path / "empty.txt", "latin1": tmp_path / "latin1.txt",
             "folder": tmp_path / "prompts"}
    files["empty"].write_text("")
    files["latin1"].write_bytes("a cat\nun caf\xe9\n".encode("latin-1"))
    files["folder"].mkdir()
    files["no image"] = tmp_path / "edits.jsonl"
    files["no image"].write_text('{"prompt": "make it red", "image": "gone.png"}\n')
    (tmp_path / "notes.png").write_text("not an image")
    files["bad image"] = tmp_path / "edits.csv"
    files["bad image"].write_text("prompt,image\nmake it red,notes.png\n")
    return files


CASES = {  # name -> (overrides, the words of the one line)
    "missing data.train": (lambda f: [f"data.train={f['missing']}"], ["data.train=", "nope.txt", "does not exist"]),
    "empty data.train": (lambda f: [f"data.train={f['empty']}"], ["empty.txt", "holds no prompts"]),
    "non-UTF-8 data.train": (lambda f: [f"data.train={f['latin1']}"], ["latin1.txt:2", "data.train", "UTF-8"]),
    "folder as data.train": (lambda f: [f"data.train={f['folder']}"], ["data.train=", "is a folder"]),
    "missing input image": (lambda f: [f"data.train={f['no image']}"], ["edits.jsonl:1", "gone.png", "does not exist"]),
    "unreadable input image": (lambda f: [f"data.test={f['bad image']}"], ["edits.csv:2", "notes.png", "not a readable image"]),
    "missing data.test": (lambda f: [f"data.test={f['missing']}"], ["data.test=", "does not exist"]),
    "unknown reward option": (lambda f: ["rewards={boldness: 1}", "reward_options.boldness.lo=1"],
                              ["reward_options.boldness.lo", "not an option", "low, high, target"]),
    "reward option of the wrong type": (lambda f: ["rewards={boldness: 1}", "reward_options.boldness.low=abc"],
                                        ["reward_options.boldness.low='abc'", "must be a number"]),
    "unreachable reward server": (lambda f: ["rewards={remote: 1}", f"reward_options.remote.url=http://127.0.0.1:{closed_port()}"],
                                  ["reward_options.remote", "no reward server answers", "serve-reward"]),
    "unreachable judge server": (lambda f: ["rewards={vlm_judge: 1}", f"reward_options.vlm_judge.url=http://127.0.0.1:{closed_port()}"],
                                 ["reward_options.vlm_judge", "nothing answers"]),
    "unknown policy option": (lambda f: ["policy.options.heigth=8"], ["policy.options.heigth", "not a setting"]),
}


@pytest.mark.parametrize("method", ["dancegrpo", "flowgrpo-sd3"])
@pytest.mark.parametrize("case", list(CASES))
def test_errors_come_before_any_model_and_leave_no_run(tmp_path, capsys, nothing_loads, method, case):
    """On the digits default and on an SD3 preset whose folder passes the check, so that only a load could find
    anything else wrong: the error is the case's own, not a load."""
    overrides, words = CASES[case]
    extra = [f"policy.path={pipeline_folder(tmp_path)}"] if method == "flowgrpo-sd3" else []
    rc = cli.main(["train", "--method", method, "--out", str(tmp_path / "run"), *QUIET, *extra, *overrides(bad_files(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Loaded" not in err, err
    assert all(w in err for w in words), (words, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["dancegrpo-sd", "dancegrpo-hunyuan", "dancegrpo-i2v", "flowgrpo-sd3"])
def test_presets_that_need_a_folder_say_so_first(tmp_path, capsys, nothing_loads, method):
    rc = cli.main(["train", "--method", method, "--out", str(tmp_path / "run"), *QUIET])
    line = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in line and "policy.path" in line and "hf download" in line, line
    (tmp_path / "f").write_text("")
    rc = cli.main(["train", "--method", method, "--out", str(tmp_path / "run"), *QUIET, f"policy.path={tmp_path / 'f'}"])
    assert rc == 2 and "is a file" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    for text in ("{}", "not json", "[1]"):
        (tmp_path / "m" / "model_index.json").write_text(text)
        rc = cli.main(["train", "--method", method, "--out", str(tmp_path / "run"), *QUIET, f"policy.path={tmp_path / 'm'}"])
        assert rc == 2 and "is not a diffusers model index" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_preflight_reads_the_prompt_files_once_for_the_trainer(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "3", "text": "3"}\n{"prompt": "7"}\n')
    files = preflight(load_config(None, [f"data.train={prompts}"]))
    assert [str(p) for p in files.train] == ["3", "7"] and files.train[0].metadata == {"text": "3"}
    assert files.test is None and files.cache is None


def test_reward_option_types_follow_the_factory(monkeypatch):
    from flowgrove.rewards.base import register_reward

    @register_reward("typed_probe")
    def typed(device=None, scale: float = 1.0, size: int | None = None, mode: str = "a", on: bool = True):
        raise AssertionError("a heavy reward is not built by the check")

    check_reward_options("typed_probe", {"scale": 2, "size": None, "mode": "b", "on": False})
    for bad, word in (({"scale": "x"}, "a number"), ({"size": 1.5}, "an integer"), ({"on": 1}, "true or false"),
                      ({"scale": True}, "a number"), ({"device": "cpu"}, "not an option")):
        with pytest.raises(ValueError, match=word):
            check_reward_options("typed_probe", bad)


def test_a_set_up_that_fails_after_the_claim_removes_the_run_folder(tmp_path, capsys):
    """The digits policy refuses a prompt it cannot draw only once it is built: the folder it was claimed in goes."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a horse\n")
    rc = cli.main(["train", "--out", str(tmp_path / "run"), *QUIET, f"data.train={prompts}"])
    assert rc == 2 and "unknown digits prompt" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    assert cli.main(["train", "--out", str(tmp_path / "kept"), *QUIET, f"data.train={prompts}"]) == 2
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"]  # only what the run wrote goes


def test_more_prompts_per_step_than_prompts_is_said(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten three\na handwritten seven\n")
    cfg = load_config(None, [f"data.train={prompts}", "rollout.prompts_per_step=4", "rollout.group_size=2",
                             "eval.every=0", "run.progress=false"])
    trainer = setup.build_trainer(cfg)
    trainer.step()  # repeats are drawn, each its own group
    assert sorted(trainer.step_prompt_ids.tolist()) == [0, 0, 1, 1]
    assert "rollout.prompts_per_step=4 is more than the 2 training prompts" in capsys.readouterr().err


def test_long_values_are_clipped_and_internal_errors_exit_1(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("x" * 1_000_000 + "\n")
    assert cli.main(["train", "--out", str(tmp_path / "run"), *QUIET, f"data.train={prompts}",
                     "rollout.prompts_per_step=1"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and len(line) < 2200 and "characters ...]" in line

    from flowgrove.recipes import train as runner

    def bug(*args, **kwargs):
        raise KeyError("a flowgrove bug")

    monkeypatch.setattr(runner, "train", bug)
    assert cli.main(["train", "--out", str(tmp_path / "run2"), *QUIET]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("flowgrove: internal error: KeyError") and "--debug" in line


def test_out_on_a_file_and_world_size_without_torchrun(tmp_path, capsys, nothing_loads, monkeypatch):
    (tmp_path / "f").write_text("")
    assert cli.main(["train", "--out", str(tmp_path / "f"), *QUIET]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "--out", str(tmp_path / "run"), *QUIET]) == 2
    line = capsys.readouterr().err.strip()
    assert "WORLD_SIZE=2" in line and "torchrun" in line and not (tmp_path / "run").exists()
    check_launcher_env({"WORLD_SIZE": "1"})  # one process: fine
    check_launcher_env({k: "1" for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")})  # torchrun's set


def test_the_torchvision_fallback_warning_is_dropped_and_nothing_else(caplog):
    logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


@pytest.mark.parametrize(("policy", "pipeline"), [("flux_kontext", "FluxKontextPipeline"),
                                                  ("qwen_image_edit", "QwenImageEditPipeline"),
                                                  ("wan", "WanImageToVideoPipeline"),
                                                  ("wan", "SkyReelsV2ImageToVideoPipeline")])
def test_a_folder_that_needs_input_images_refuses_prompts_without_them_first(tmp_path, capsys, nothing_loads, policy,
                                                                            pipeline):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(f'{{"_class_name": "{pipeline}"}}')
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "red.png")
    (tmp_path / "mixed.jsonl").write_text('{"prompt": "make it red", "image": "red.png"}\n{"prompt": "a dog"}\n')
    base = ["train", "--out", str(tmp_path / "run"), *QUIET, f"policy.name={policy}", f"policy.path={folder}",
            "policy.lora_rank=4", "rewards={brightness: 1.0}"]
    for extra, words in (([], ["data.train", "default prompts have none", ".jsonl"]),
                         ([f"data.train={tmp_path / 'mixed.jsonl'}"], ["data.train", "prompt 2", "'a dog'", "no input image"])):
        rc = cli.main([*base, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Loaded" not in err, err
        assert all(w in err for w in words), (words, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("pipeline", "rows", "words"), [
    ("QwenImageEditPipeline", ['["red.png", "blue.png"]'], ["prompt 1", "has 2 input images", "takes one per prompt"]),
    ("FluxKontextPipeline", ['"red.png"', '"red.png;blue.png"'], ["prompt 2", "has 2 input images", "one image per row"]),
    ("QwenImageEditPlusPipeline", ['["red.png", "blue.png"]', '"red.png"'],
     ["prompt 2", "has 1 input image and prompt 1 has 2", "the same number"]),
])
def test_the_number_of_input_images_per_row_is_checked_first(tmp_path, capsys, nothing_loads, pipeline, rows, words):
    """One image per row unless the folder takes several (``QwenImageEditPlusPipeline``), and then one number for
    every row of the file, as its rows' image tokens stack."""
    from PIL import Image

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(f'{{"_class_name": "{pipeline}"}}')
    for name in ("red.png", "blue.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "p.jsonl").write_text("".join(f'{{"prompt": "edit {i}", "image": {row}}}\n' for i, row in enumerate(rows)))
    policy = "flux_kontext" if "Flux" in pipeline else "qwen_image_edit"
    rc = cli.main(["train", "--out", str(tmp_path / "run"), *QUIET, f"policy.name={policy}", f"policy.path={folder}",
                   "policy.lora_rank=4", "rewards={brightness: 1.0}", f"data.train={tmp_path / 'p.jsonl'}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Loaded" not in err, err
    assert all(w in err for w in ["data.train", *words]), (words, err)
    assert not (tmp_path / "run").exists()


def test_a_plus_folder_takes_rows_of_several_images(tmp_path):
    from PIL import Image

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "QwenImageEditPlusPipeline"}')
    Image.new("RGB", (8, 8)).save(tmp_path / "red.png")
    (tmp_path / "p.csv").write_text("prompt,image\nmerge them,red.png;red.png\nagain,red.png;red.png\n")
    cfg = load_config(None, ["policy.name=qwen_image_edit", f"policy.path={folder}", "policy.lora_rank=4",
                             f"data.train={tmp_path / 'p.csv'}"], method="dancegrpo")
    assert [len(row.metadata["images"]) for row in preflight(cfg).train] == [2, 2]


def test_a_text_to_video_wan_folder_needs_no_input_images(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    cfg = load_config(None, ["policy.name=wan", f"policy.path={folder}", "policy.lora_rank=4"], method="dancegrpo")
    assert preflight(cfg).train is None  # the default prompts serve
