"""`flowgrove bench-model`: the tiny run end to end, counted FLOPs, peaks, targets and the shipped configs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from flowgrove import cli
from flowgrove.bench import cases as bc
from flowgrove.bench import model as bm
from flowgrove.bench import models
from flowgrove.bench import perf


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-model")
    assert cli.main(["bench-model", "--tiny", "--device", "cpu", "--out", str(out)]) == 0
    return json.loads((out / "bench_model.json").read_text()), (out / "bench_model.md").read_text()


def _rows(report, section, case=None):
    return [r for r in report["rows"] if r["section"] == section and (case is None or r["case"] == case)]


def test_tiny_run_measures_every_section(tiny_report):
    report, table = tiny_report
    assert report["model"]["name"] == "flux-tiny" and report["device"]["type"] == "cpu"
    assert {r["status"] for r in report["rows"]} == {"ok"}
    keys = {(r["section"], r["case"], r["resolution"], r["batch"]) for r in report["rows"]}
    for res in (32, 64):
        assert {("rollout", "sde-step", res, b) for b in (1, 4, 16)} <= keys
        assert {("decode", "vae", res, b) for b in (1, 4)} <= keys
        assert {("train", c, res, 1) for c in ("lora", "lora+ckpt", "full", "full+ckpt")} <= keys
    for r in report["rows"]:
        assert r["seconds"] > 0 and len(r["seconds_all"]) == 3 and r["flops"] > 0 and r["peak_memory_gib"] > 0
        assert r["tflops"] is None and r["mfu"] is None  # CPU without --peak-tflops: n/a
    assert "| 64 | rollout | sde-step | 16 |" in table and "Targets (issue 8):" in table
    assert "peak RSS" in report["memory"]


def test_rollout_speedup_is_batch_times_single_over_batched(tiny_report):
    report, _ = tiny_report
    for res in (32, 64):
        rows = {r["batch"]: r for r in _rows(report, "rollout") if r["resolution"] == res}
        for b, r in rows.items():
            assert r["speedup_vs_one_per_call"] == pytest.approx(b * rows[1]["seconds"] / r["seconds"])
        speedup = next(t for t in report["targets"] if t["resolution"] == res and "per sample" in t["name"])
        assert speedup["value"] == pytest.approx(rows[16]["speedup_vs_one_per_call"])


def test_counted_flops_scale_and_recompute(tiny_report):
    report, _ = tiny_report
    for res in (32, 64):
        fwd = {r["batch"]: r["flops"] for r in _rows(report, "rollout") if r["resolution"] == res}
        assert fwd[16] == 16 * fwd[1]  # counted at the measured shapes; linear in the batch
        train = {r["case"]: r for r in _rows(report, "train") if r["resolution"] == res}
        assert 2.8 < train["full"]["flops"] / fwd[1] < 3.1  # forward + input and weight gradients
        assert train["lora"]["flops"] < train["full"]["flops"]
        for mode in ("lora", "full"):
            ckpt, plain = train[f"{mode}+ckpt"], train[mode]
            assert ckpt["model_flops"] == plain["flops"] < ckpt["flops"]  # MFU leaves the recompute out
        recompute = train["full+ckpt"]["flops"] - train["full"]["flops"]
        assert recompute == pytest.approx(fwd[1], rel=0.1)  # the blocks' forward, once more


def test_cpu_attention_flops_are_counted():
    q, k, v = (torch.randn(2, 3, n, 8, requires_grad=True) for n in (10, 12, 12))
    assert perf.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 4 * 2 * 3 * 10 * 12 * 8
    assert perf.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) > 4 * 2 * 3 * 10 * 12 * 8


def test_peaks_throughput_and_targets():
    assert perf.peak_for_name("NVIDIA H200")[1] == 989 and perf.peak_for_name("NVIDIA H100 80GB HBM3")[1] == 989
    assert perf.peak_for_name("NVIDIA H100 PCIe")[1] == 756 and perf.peak_for_name("NVIDIA A100-SXM4-80GB")[1] == 312
    assert perf.peak_for_name("NVIDIA L4")[1] == 121 and perf.peak_for_name("NVIDIA L40S")[1] == 362
    assert perf.peak_for_name("NVIDIA GeForce GTX 1080") is None
    assert perf.device_peak_tflops(torch.device("cpu"), None)[0] is None
    assert perf.device_peak_tflops(torch.device("cpu"), 2.0) == (2.0, "--peak-tflops")
    row = bc.Row("train", "full+ckpt", 720, 1, seconds=0.5, flops=4e12, model_flops=3e12)
    row = bm.with_throughput(row, 10.0)
    assert row.tflops == pytest.approx(6.0) and row.mfu == pytest.approx(0.6) and row.hfu == pytest.approx(0.8)
    rollout = [bc.Row("rollout", "sde-step", 720, b, seconds=s, mfu=m) for b, s, m in ((1, 1.0, 0.1), (16, 2.0, 0.55))]
    checks = {c.name: c for c in bm.target_checks(bm.with_speedups(rollout + [row]))}
    assert checks["rollout MFU at batch >= 16"].met is True
    assert checks["training step MFU (full+ckpt)"].met is True
    assert checks["batched vs one sample per call, per sample"].value == pytest.approx(8.0)


def test_out_of_memory_becomes_a_row():
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    settings = bc.BenchSettings(device=torch.device("cpu"), dtype=torch.float32, resolutions=(32,))
    row = bc.run_case(bc.Row("train", "full", 1024, 1), oom, settings)
    assert row.status == "oom" and "Tried to allocate" in row.note and row.seconds is None


def test_shipped_configs_are_flux1_dev_shapes():
    spec = models.model_spec(tiny=False)
    t, v = spec.transformer, spec.vae
    assert (t["num_layers"], t["num_single_layers"], t["num_attention_heads"] * t["attention_head_dim"]) == (19, 38, 3072)
    assert t["guidance_embeds"] and t["axes_dims_rope"] == [16, 56, 56] and spec.text_tokens == 512
    assert v["latent_channels"] == 16 and v["block_out_channels"] == [128, 256, 512, 512]
    assert (v["scaling_factor"], v["shift_factor"], v["use_quant_conv"]) == (0.3611, 0.1159, False)
    assert models.model_parameters(spec) == {"transformer": 11_901_408_320, "vae": 83_819_683}  # FLUX.1-dev's counts
    assert [models.latent_side(r, v) for r in (720, 1024, 512)] == [90, 128, 64]  # FluxPipeline.prepare_latents
    tiny = models.model_spec(tiny=True).transformer
    assert {k: tiny[k] for k in ("in_channels", "guidance_embeds", "patch_size")} == \
        {k: t[k] for k in ("in_channels", "guidance_embeds", "patch_size")}


def test_bad_flags_are_errors(capsys):
    assert cli.main(["bench-model", "--device", "cpu"]) == 2  # the FLUX.1-dev shape on a CPU
    assert "--tiny" in capsys.readouterr().err
    assert cli.main(["bench-model", "--tiny", "--device", "cpu", "--rollout-batches", "1,x"]) == 2
    assert "--rollout-batches" in capsys.readouterr().err
    assert cli.main(["bench-model", "--tiny", "--device", "cpu", "--peak-tflops", "-1"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_run_on_cuda(tmp_path):
    assert cli.main(["bench-model", "--tiny", "--iters", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_model.json").read_text())
    assert report["device"]["type"] == "cuda" and report["settings"]["dtype"] == "torch.bfloat16"
    assert {r["status"] for r in report["rows"]} == {"ok"}
    assert all(r["peak_memory_gib"] > 0 for r in report["rows"])
    if report["peak_tflops"] is not None:
        assert all(0 < r["mfu"] < 1 for r in report["rows"])


def test_allocation_failures_count_as_out_of_memory():
    assert perf.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not perf.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    settings = bc.BenchSettings(device=torch.device("cpu"), dtype=torch.float32, resolutions=(32,))
    with pytest.raises(RuntimeError, match="shapes"):
        bc.run_case(bc.Row("rollout", "sde-step", 32, 1), lambda: perf.count_flops(lambda: torch.ones(2, 3) @ torch.ones(2, 3)),
                    settings)


def test_flux1_dev_forward_flops_counted_on_meta():
    """The counter at FLUX.1-dev's 720² shapes (2025 image + 512 text tokens), without memory: 37.3 TFLOP per
    sample; 2 * parameters * tokens would say 60.4, because the adaLN projections act once per sample, not token."""
    from diffusers import FluxTransformer2DModel

    from flowgrove.policies.flux import latent_image_ids

    spec = models.model_spec(tiny=False)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**spec.transformer)
    side = models.latent_side(720, spec.vae)
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    inputs = dict(hidden_states=meta(1, (side // 2) ** 2, 64), encoder_hidden_states=meta(1, 512, 4096),
                  pooled_projections=meta(1, 768), timestep=meta(1), guidance=meta(1),
                  img_ids=latent_image_ids(side, side, "meta"), txt_ids=meta(512, 3), return_dict=False)
    flops = perf.count_flops(torch.no_grad()(lambda: model(**inputs)))
    assert flops / 1e12 == pytest.approx(37.28, abs=0.01)
