"""The production path on a CPU: device discipline, float32 masters under bf16, adapter options, memory switches
(gradient checkpointing, decode and rollout chunking). The `gpu`-marked test runs the same on CUDA."""

from __future__ import annotations

import pytest
import torch

from flowgrove.config.load import load_config
from flowgrove.parallel import rank_share
from flowgrove.training import method, rollout as rollout_mod
from flowgrove.training.prepare import float32_masters, policy_kwargs, prepare_policy
from flowgrove.training.trainer import GRPOTrainer

from conftest import TinyPolicy, brightness
from test_policies import _save_tiny_flux_pipeline

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "train.micro_batch=1000"]


def _trainer(policy, *extra: str, method_name: str = "dancegrpo", prompts=("zero", "one", "two")) -> GRPOTrainer:
    cfg = load_config(None, SMALL + list(extra), method=method_name)
    cfg.rewards = {"brightness": 1.0}
    return GRPOTrainer(cfg, policy, {"brightness": brightness}, list(prompts))


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_flux")
    _save_tiny_flux_pipeline(path)
    return path


# ---- devices -----------------------------------------------------------------------------------------------------
def test_every_noise_draw_comes_from_a_cpu_generator(monkeypatch):
    # diffusers' randn_tensor discipline: noise is drawn on the generator's device (the CPU) and then moved, so a
    # seed gives the same samples on CPU and GPU, and a CUDA run never hands a CPU generator to a CUDA randn.
    draws = []
    real = torch.randn

    def randn(*args, generator=None, device=None, **kwargs):
        draws.append((None if generator is None else generator.device, None if device is None else torch.device(device)))
        return real(*args, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)
    for name in ("dancegrpo", "branchgrpo-mix"):
        t = _trainer(TinyPolicy(), "rollout.prompts_per_step=1" if name.startswith("branch") else "train.seed=0", method_name=name)
        t.step()
        t.evaluate()
    assert draws and all(gen == torch.device("cpu") for gen, _ in draws)  # every draw has a CPU generator
    assert all(dev in (None, torch.device("cpu")) for _, dev in draws)  # and is made on the CPU


def test_rollout_tensors_live_on_the_policy_device():
    t = _trainer(TinyPolicy())
    cfg = t.cfg
    plan = method.step_plan(cfg, 0)
    share = rank_share.rank_share(cfg, 1, 0)
    roots, x = share.roots, method.initial_noise(cfg, t.policy.latent_shape, share, torch.Generator().manual_seed(0))
    mask = method.store_mask(cfg, plan, roots.shape[0], torch.Generator().manual_seed(1))
    ro = rollout_mod.rollout(t.policy, t.cond, roots, x, method.rollout_spec(cfg, plan), torch.Generator(), store_mask=mask)
    device = next(t.policy.module.parameters()).device
    tensors = [ro.leaves, ro.leaf_cond_index, *ro.edge_log_probs, *(v for v in ro.transitions if v is not None)]
    assert all(v.device == device for v in tensors)


def test_run_device_auto_is_the_cpu_without_cuda_and_cuda_is_refused():
    from flowgrove.parallel.distributed import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(ValueError, match="run.device=cuda.*no CUDA.*run.device=cpu"):
        resolve_device("cuda")


# ---- precision ---------------------------------------------------------------------------------------------------
def _flux_cfg(path, *extra: str):
    return load_config(None, [f"policy.name=flux1", f"policy.path={path}", "policy.dtype=bfloat16",
                              "policy.options={height: 16, width: 16, max_sequence_length: 8}", "run.device=cpu", *extra])


def test_bf16_flux_trains_float32_masters_and_one_small_step_changes_every_weight(tiny_flux_dir):
    cfg = _flux_cfg(tiny_flux_dir)
    policy = prepare_policy(cfg, torch.device("cpu"))
    assert policy.pipe.vae.dtype == torch.bfloat16 and policy.pipe.text_encoder.dtype == torch.bfloat16  # frozen: bf16
    trainable = [p for p in policy.module.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # float32 master weights
    assert policy.adapter.compute_dtype == torch.bfloat16
    t = _trainer(policy, "train.lr=1e-5", "train.accumulate_size=1000", "train.max_grad_norm=0",
                 prompts=("a cat", "a dog"))
    before = [p.detach().clone() for p in t.params]
    metrics = t.step()
    assert metrics["updates"] == 1
    changed = [not torch.equal(b, p) for b, p in zip(before, t.params)]
    assert all(changed), f"{changed.count(False)} of {len(changed)} parameters did not move"
    state = t.optimizer.state[t.params[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    # per element: the float32 masters take (nearly) every update; the same update applied to bf16 weights (what
    # training bf16 weights directly did) is mostly rounded away
    n = sum(b.numel() for b in before)
    fp32_moved = sum(int((b != p.detach()).sum()) for b, p in zip(before, t.params)) / n
    bf16_moved = sum(int((b.to(torch.bfloat16) != (b.to(torch.bfloat16).float() + (p.detach() - b)).to(torch.bfloat16)).sum())
                     for b, p in zip(before, t.params)) / n
    assert fp32_moved > 0.95 and bf16_moved < 0.5, (fp32_moved, bf16_moved)


def test_lora_adapters_are_float32_on_a_bf16_base(tiny_flux_dir):
    policy = prepare_policy(_flux_cfg(tiny_flux_dir, "policy.lora_rank=4"), torch.device("cpu"))
    named = dict(policy.module.named_parameters())
    lora = {n: p for n, p in named.items() if "lora_" in n}
    assert lora and all(p.requires_grad and p.dtype == torch.float32 for p in lora.values())
    base = [p for n, p in named.items() if "lora_" not in n]
    assert base and all(not p.requires_grad and p.dtype == torch.bfloat16 for p in base)


def test_float32_masters_leaves_frozen_weights_alone():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).to(torch.bfloat16)
    module[0].requires_grad_(False)
    assert float32_masters(module) == 2
    assert module[0].weight.dtype == torch.bfloat16 and module[1].weight.dtype == torch.float32


def test_policy_options_reach_the_factory_and_unknown_ones_are_named(tiny_flux_dir):
    cfg = _flux_cfg(tiny_flux_dir)
    kwargs = policy_kwargs(cfg, torch.device("cpu"))
    assert kwargs["height"] == 16 and kwargs["max_sequence_length"] == 8 and kwargs["dtype"] == "bfloat16"
    cfg.policy.options = {"hieght": 64}
    with pytest.raises(ValueError, match=r"policy.options.hieght is not a setting of policy 'flux1'.*height"):
        policy_kwargs(cfg, torch.device("cpu"))


def test_digits_policy_runs_under_bf16_autocast():
    cfg = load_config(None, SMALL + ["policy.dtype=bfloat16", "run.device=cpu"])
    policy = prepare_policy(cfg, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in policy.module.parameters())
    seen = []
    hook = policy.module.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.append(out[1].dtype))
    x = torch.randn(2, *policy.latent_shape)
    v = policy.velocity(x, torch.full((2,), 0.5), policy.encode_prompts(["a handwritten one", "a handwritten two"]))
    hook.remove()
    assert seen == [torch.bfloat16] and v.dtype == torch.float32


# ---- memory ------------------------------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_step(tiny_flux_dir):
    results = []
    for ckpt in (False, True):
        cfg = load_config(None, [f"policy.name=flux1", f"policy.path={tiny_flux_dir}",
                                 "policy.options={height: 16, width: 16, max_sequence_length: 8}", "run.device=cpu",
                                 f"train.gradient_checkpointing={str(ckpt).lower()}"])
        policy = prepare_policy(cfg, torch.device("cpu"))
        assert policy.module.is_gradient_checkpointing == ckpt
        policy.module.train()
        t = _trainer(policy, prompts=("a cat", "a dog"))
        metrics = t.step()
        results.append((metrics["loss"], [p.detach().clone() for p in t.params]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params_a, params_b))


def test_gradient_checkpointing_on_a_module_without_it_is_a_named_error():
    from flowgrove.training.prepare import enable_gradient_checkpointing

    with pytest.raises(ValueError, match="train.gradient_checkpointing=true.*set train.gradient_checkpointing=false"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["dancegrpo", "branchgrpo"])
def test_rollout_chunking_and_decode_batches_do_not_change_a_step(name):
    outs = []
    for extra in ([], ["sampler.chunk_size=3", "rollout.decode_batch=5"]):
        t = _trainer(TinyPolicy(), "rollout.prompts_per_step=1" if name.startswith("branch") else "train.seed=0",
                     *extra, method_name=name)
        calls = []
        real = t.policy.velocity
        t.policy.velocity = lambda x, s, c, _real=real: (torch.is_grad_enabled() or calls.append(x.shape[0]), _real(x, s, c))[1]
        m = t.step()
        outs.append((m, [p.detach().clone() for p in t.params], calls))
    (m0, p0, c0), (m1, p1, c1) = outs
    assert max(c1) <= 3 < max(c0)  # the chunked rollout (no grad) never called the model on more than 3 rows
    assert m0["reward_mean"] == pytest.approx(m1["reward_mean"], abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(p0, p1))


def test_decode_batched_splits_calls():
    calls = []

    class Decoder:
        def decode(self, x):
            calls.append(x.shape[0])
            return x * 2

    x = torch.randn(7, 1, 2, 2)
    assert torch.equal(rollout_mod.decode_batched(Decoder(), x, 3), x * 2)
    assert calls == [3, 3, 1]


# ---- GPU (run by the GPU check; skipped here) --------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["dancegrpo", "mixgrpo-flash", "branchgrpo-widpru"])
def test_trainer_steps_on_cuda(name):
    policy = TinyPolicy()
    policy.module.cuda()
    t = _trainer(policy, "run.device=cuda", "rollout.prompts_per_step=1" if name.startswith("branch") else "train.seed=0",
                 method_name=name)
    assert t.cond.prompt_embeds.is_cuda
    for _ in range(2):
        metrics = t.step()
    assert metrics["updates"] >= 1 and all(p.is_cuda for p in t.params)
    cpu = _trainer(TinyPolicy(), "run.device=cpu", "rollout.prompts_per_step=1" if name.startswith("branch") else "train.seed=0",
                   method_name=name)
    first_cpu = cpu.step()
    t_gpu = _trainer(TinyPolicy(), "run.device=cuda", "rollout.prompts_per_step=1" if name.startswith("branch") else "train.seed=0",
                     method_name=name)
    t_gpu.policy.module.cuda()
    first_gpu = t_gpu.step()
    assert first_gpu["reward_mean"] == pytest.approx(first_cpu["reward_mean"], abs=1e-3)  # same seed, same samples
