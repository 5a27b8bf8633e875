"""Prompt data: txt / jsonl / csv files with metadata for the rewards, train and test sets, encoder caches."""

from __future__ import annotations

import json

import pytest
import torch

from flowgrove import cli
from flowgrove.config.load import load_config
from flowgrove.training.prompts import CachedPrompts, Prompt, read_index, read_prompts, write_cache
from flowgrove.training.trainer import GRPOTrainer

from conftest import TinyPolicy, brightness
from test_policies import _save_tiny_flux_pipeline

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "train.micro_batch=1000"]


def test_three_formats_keep_their_metadata(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a sign that says HELLO", "text": "HELLO"}\n\n{"prompt": "two cats", "tag": "counting", "n": 2}\n')
    (tmp_path / "p.csv").write_text('prompt,text\n"a sign that says ""HI""",HI\nplain,\n')
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    jsonl = read_prompts(tmp_path / "p.jsonl")
    assert jsonl == ["a sign that says HELLO", "two cats"] and all(isinstance(p, Prompt) for p in jsonl)
    assert jsonl[0].metadata == {"text": "HELLO"} and jsonl[1].metadata == {"tag": "counting", "n": 2}
    csv = read_prompts(tmp_path / "p.csv")
    assert csv == ['a sign that says "HI"', "plain"] and csv[0].metadata == {"text": "HI"}
    import pickle

    assert pickle.loads(pickle.dumps(jsonl[0])).metadata == {"text": "HELLO"}


@pytest.mark.parametrize("name, text, words", [
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', ["bad.jsonl:2", "JSON"]),
    ("noprompt.jsonl", '{"caption": "x"}\n', ["noprompt.jsonl:1", '"prompt"']),
    ("nocol.csv", "caption\nx\n", ["nocol.csv:1", "'prompt' column"]),
    ("empty.txt", "\n\n", ["empty.txt", "no prompts"]),
    ("p.parquet", "x", ["p.parquet", ".txt, .jsonl or .csv"]),
])
def test_bad_prompt_files_name_file_and_line(tmp_path, name, text, words):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as err:
        read_prompts(tmp_path / name, "data.train")
    assert all(w in str(err.value) for w in words), str(err.value)
    with pytest.raises(FileNotFoundError, match="data.train=.*does not exist"):
        read_prompts(tmp_path / "missing.txt", "data.train")


def _write_png(path, color=(200, 30, 30), size=(8, 8)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_input_images_are_paths_relative_to_the_prompt_file(tmp_path):
    image = _write_png(tmp_path / "data" / "in" / "cat.png")
    (tmp_path / "data" / "p.jsonl").write_text('{"prompt": "make it blue", "image": "in/cat.png", "tag": "x"}\n'
                                              '{"prompt": "no image"}\n')
    (tmp_path / "data" / "p.csv").write_text("prompt,image\nmake it blue,in/cat.png\nno image,\n")
    for name in ("p.jsonl", "p.csv"):
        first, second = read_prompts(tmp_path / "data" / name)
        assert first.metadata["image"] == str(image.absolute()) and "image" not in second.metadata
    assert read_prompts(tmp_path / "data" / "p.jsonl")[0].metadata["tag"] == "x"


def test_several_input_images_are_a_jsonl_list_or_a_semicolon_separated_csv_cell(tmp_path):
    """Qwen-Image-Edit-2509 rows: ``metadata["images"]`` holds every path in order, ``metadata["image"]`` the first
    (the one ``clip_direction`` compares with); a one-image row has both too."""
    cat, hat = _write_png(tmp_path / "in" / "cat.png"), _write_png(tmp_path / "in" / "hat.png")
    (tmp_path / "p.jsonl").write_text('{"prompt": "put the hat on the cat", "image": ["in/cat.png", "in/hat.png"]}\n'
                                      '{"prompt": "one", "image": "in/cat.png"}\n')
    (tmp_path / "p.csv").write_text("prompt,image\nput the hat on the cat,in/cat.png; in/hat.png\none,in/cat.png\n")
    for name in ("p.jsonl", "p.csv"):
        several, one = read_prompts(tmp_path / name)
        assert several.metadata == {"image": str(cat.absolute()), "images": [str(cat.absolute()), str(hat.absolute())]}
        assert one.metadata == {"image": str(cat.absolute()), "images": [str(cat.absolute())]}


@pytest.mark.parametrize("row, words", [
    ('{"prompt": "a", "image": ["ok.png", "gone.png"]}', ["p.jsonl:2", "'gone.png'", "does not exist"]),
    ('{"prompt": "a", "image": []}', ["p.jsonl:2", '"image" []', "no path", "jsonl list"]),
    ('{"prompt": "a", "image": "ok.png;"}', ["p.jsonl:2", "an empty path", '";"-separated']),
    ('{"prompt": "a", "image": "ok.png", "images": ["x.png"]}', ["p.jsonl:2", '"images" is the name', '"image"']),
    ('{"prompt": "a", "image": "gone.png"}', ["p.jsonl:2", "'gone.png'", "does not exist"]),
    ('{"prompt": "a", "image": "notes.png"}', ["p.jsonl:2", "'notes.png'", "not a readable image"]),
    ('{"prompt": "a", "image": 3}', ["p.jsonl:2", '"image"', "relative to the prompt file"]),
])
def test_a_missing_or_unreadable_input_image_names_the_file_and_row(tmp_path, row, words):
    _write_png(tmp_path / "ok.png")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "p.jsonl").write_text('{"prompt": "fine", "image": "ok.png"}\n' + row + "\n")
    with pytest.raises(ValueError) as err:
        read_prompts(tmp_path / "p.jsonl", "data.train")
    assert all(w in str(err.value) for w in words), str(err.value)


def test_the_input_image_reaches_the_rewards_and_the_cache_index(tmp_path):
    """A prompt file's input images ride with the prompts to the rewards (``prompt.metadata["image"]``) and into an
    ``encode-prompts`` cache's index (its prompts keep their metadata)."""
    images = [_write_png(tmp_path / f"{i}.png", (40 * i, 0, 0)) for i in range(3)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"edit {i}", "image": f"{i}.png"}) + "\n"
                                              for i in range(3)))
    prompts = read_prompts(tmp_path / "p.jsonl")
    seen: list = []

    def recording(images_out, prompts_in):
        seen.append([(str(p), p.metadata["image"]) for p in prompts_in])
        return brightness(images_out, prompts_in)

    _trainer(prompts, reward=recording).step()
    assert seen and all(path == str(images[int(name[-1])].absolute()) for name, path in seen[-1])
    cached = CachedPrompts(write_cache(TinyPolicy(), prompts, tmp_path / "cache", "digits"))
    assert [p.metadata["image"] for p in cached.prompts()] == [str(i.absolute()) for i in images]


def _trainer(prompts, test=None, rows=None, reward=brightness) -> GRPOTrainer:
    cfg = load_config(None, SMALL)
    cfg.rewards = {"brightness": 1.0}
    return GRPOTrainer(cfg, TinyPolicy(), {"brightness": reward}, prompts, test, rows)


def test_metadata_reaches_the_rewards_and_evaluation_uses_the_test_prompts():
    seen: list = []

    def recording(images, prompts):
        seen.append([(str(p), getattr(p, "metadata", {}).get("text")) for p in prompts])
        return brightness(images, prompts)

    train = [Prompt("sign A", {"text": "A"}), Prompt("sign B", {"text": "B"}), Prompt("sign C", {"text": "C"})]
    test = [Prompt("held-out D", {"text": "D"})]
    t = _trainer(train, test, reward=recording)
    t.step()
    assert seen[-1] and all(text == name[-1] for name, text in seen[-1])  # each image came with its own metadata
    assert {name for name, _ in seen[-1]} <= {"sign A", "sign B", "sign C"}
    t.evaluate()
    assert {name for name, _ in seen[-1]} == {"held-out D"}  # the held-out evaluation scores the test prompts


def test_cache_rows_equal_the_encoder_and_training_from_the_cache_equals_training_in_memory(tmp_path):
    policy = TinyPolicy()
    prompts = [Prompt(f"prompt {i}", {"i": i}) for i in range(7)]
    write_cache(policy, prompts, tmp_path / "cache", "tiny", batch=2, shard_rows=3)
    index = read_index(tmp_path / "cache")
    assert [s["count"] for s in index["shards"]] == [3, 3, 1] and index["num_prompts"] == 7
    cache = CachedPrompts(tmp_path / "cache")
    ids = torch.tensor([6, 0, 4, 4, 2])
    want = policy.encode_prompts([prompts[i] for i in ids])
    got = cache.rows(ids)
    assert torch.equal(got.prompt_embeds, want.prompt_embeds) and torch.equal(got.pooled, want.pooled)
    assert cache.prompts() == prompts and cache.prompts()[3].metadata == {"i": 3}
    with pytest.raises(IndexError, match="outside the cache's 7 prompts"):
        cache.rows(torch.tensor([7]))
    in_memory, cached = _trainer(prompts), _trainer(prompts, rows=cache)
    assert cached.cond is None  # the training prompts never sit in memory or on the device as a whole
    for _ in range(2):
        a, b = in_memory.step(), cached.step()
        assert {k: v for k, v in a.items() if not k.startswith("seconds")} == {k: v for k, v in b.items() if not k.startswith("seconds")}


def test_encode_prompts_cli_then_train_from_the_cache(tmp_path, capsys):
    digits = [f"a handwritten {w}" for w in ("zero", "one", "two", "three")]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "digit": i}) + "\n" for i, p in enumerate(digits)))
    cache = tmp_path / "cache"
    assert cli.main(["encode-prompts", str(tmp_path / "p.jsonl"), "--policy", "digits", "--out", str(cache), "--shard-rows", "3"]) == 0
    assert "data.cache=" in capsys.readouterr().out
    assert read_index(cache)["policy"] == "digits" and len(read_index(cache)["shards"]) == 2
    run = tmp_path / "run"
    assert cli.main(["train", "--steps", "1", "--out", str(run), *SMALL, "eval.samples_per_prompt=1", "run.progress=false",
                     f"data.cache={cache}"]) == 0
    # a cache of another policy is refused with the key and the fix
    index = read_index(cache)
    index["policy"] = "flux1"
    (cache / "index.json").write_text(json.dumps(index))
    code = cli.main(["train", "--steps", "1", "--out", str(tmp_path / "run2"), *SMALL, f"data.cache={cache}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.cache=" in err[0] and "encode-prompts --policy digits" in err[0]


@pytest.mark.slow
def test_flux1_end_to_end_bf16_lora_checkpointing_chunked_decode_and_cached_prompts(tmp_path):
    from flowgrove.recipes import train as runner
    from flowgrove.runs.metrics import read_metrics

    folder = tmp_path / "flux"
    _save_tiny_flux_pipeline(folder)
    (tmp_path / "p.txt").write_text("a red cat\na blue dog\na green bird\n")
    policy = ["policy.name=flux1", f"policy.path={folder}", "policy.dtype=bfloat16",
              "policy.options={height: 16, width: 16, max_sequence_length: 8}"]
    assert cli.main(["encode-prompts", str(tmp_path / "p.txt"), "--policy", "flux1", "--out", str(tmp_path / "cache"), *policy[1:]]) == 0
    cfg = load_config(None, [*policy, "policy.lora_rank=4", "train.gradient_checkpointing=true", "rollout.decode_batch=3",
                             "sampler.chunk_size=4", f"data.cache={tmp_path / 'cache'}", f"data.test={tmp_path / 'p.txt'}",
                             "rewards={brightness: 1.0}", "rollout.prompts_per_step=2", "rollout.group_size=4",
                             "sampler.num_steps=4", "eval.num_steps=4", "eval.samples_per_prompt=2", "train.steps=2",
                             "run.progress=false", f"run.out={tmp_path / 'run'}"])
    result = runner.train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["updates"] >= 1 for r in rows)
    assert result.summary["steps"] == 2 and (tmp_path / "run" / "samples_after.png").is_file()
