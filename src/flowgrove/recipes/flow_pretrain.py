"""Rectified-flow pretraining of a built-in tiny FLUX pixel policy (digits, numbers), shared by the pretrain recipes.

``sigma`` logit-normal, ``x_sigma = (1 - sigma) x0 + sigma noise``, target ``v = noise - x0``, MSE (SD3, Esser et
al. 2024); the transformer and its CLIP text encoder train jointly with AdamW, every draw from seeded generators.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from tqdm import tqdm

from flowgrove.policies import digits as digits_policy
from flowgrove.policies.digits import DIGITS, TinyFluxPolicy, TinyFluxTask
from flowgrove.policies.flux import FluxAdapter
from flowgrove.samplers import sample_euler
from flowgrove.samplers.schedules import flux_sigmas
from flowgrove.tasks.digits import DigitsData


def logit_normal_sigma(batch: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """``sigmoid(N(mean, std^2))`` noise levels ``[B]`` (logit-normal sampling, SD3, Esser et al. 2024)."""
    return torch.sigmoid(mean + std * torch.randn(batch, generator=generator))  # [B]


def rectified_flow_pair(x0: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Noised input ``(1 - sigma) x0 + sigma noise`` and velocity target ``noise - x0`` (Liu et al. 2023).

    Args:
        x0: Data ``[B, ...]``.
        noise: Standard normal ``[B, ...]``.
        sigma: Noise levels ``[B]``.

    Returns:
        ``(x_sigma [B, ...], v_target [B, ...])``.
    """
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))  # [B, 1, ...]
    return (1 - s) * x0 + s * noise, noise - x0


def train_policy(train: DigitsData, *, steps: int, seed: int, batch: int = 256, lr: float = 2e-3,
                 progress: bool = True, task: TinyFluxTask = DIGITS) -> tuple[nn.Module, nn.Module, float]:
    """Rectified-flow training of ``task``'s transformer and its text encoder, jointly, with AdamW.

    Args:
        train: Training images ``[N, *task.latent_shape]`` in [-1, 1]; labels are rows of ``task.table()`` (the
            digit for digits, the number for numbers).
        steps: Optimizer steps.
        seed: Seeds the initialisation and every batch, sigma and noise draw.
        batch: Images per step.
        lr: Peak learning rate (linear warm-up over 5% of the steps, cosine decay to 10%).
        progress: Show a tqdm bar.
        task: The policy's task (architecture, vocabulary, prompt table).

    Returns:
        ``(transformer, text_encoder, final_loss)``; ``final_loss`` averages the last 50 steps.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = digits_policy.new_transformer()
        text_encoder = digits_policy.new_text_encoder(digits_policy.text_encoder_config(task))
    adapter = FluxAdapter(transformer, guidance=None)
    params = [*transformer.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps))
    prompt_ids = digits_policy.tokenize(task.table(), task.vocab, task.max_length)  # [P, L]
    transformer.train()
    text_encoder.train()
    losses = []
    for _ in tqdm(range(steps), desc=f"pretrain {task.name} policy", disable=not progress, leave=False):
        rows = torch.randint(train.labels.shape[0], (batch,), generator=generator)  # [B]
        x0 = train.images[rows]  # [B, 1, H, W]
        noise = torch.randn(x0.shape, generator=generator)  # [B, 1, H, W]
        sigma = logit_normal_sigma(batch, generator)  # [B]
        x_sigma, target = rectified_flow_pair(x0, noise, sigma)  # [B, 1, H, W] each
        cond = digits_policy.encode_text(text_encoder, prompt_ids).select(train.labels[rows])  # [B, L, D], [B, D]
        loss = nn.functional.mse_loss(adapter.velocity(x_sigma, sigma, cond), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    tail = losses[-50:]
    return transformer.eval(), text_encoder.eval(), sum(tail) / max(len(tail), 1)


def _warmup_cosine(steps: int):
    """LambdaLR factor: linear warm-up over 5% of ``steps``, then cosine decay to 10%."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def sample_prompts(policy: TinyFluxPolicy, prompts: list[str], *, num_steps: int = 16, shift: float = 3.0,
                   seed: int = 0) -> Tensor:
    """Euler ODE samples of ``prompts`` from seeded noise (FLUX grid ``flux_sigmas``), images ``[N, 3, H, W]``."""
    cond = policy.encode_prompts(prompts)  # [N, L, D], [N, D]
    device = cond.prompt_embeds.device
    noise = torch.randn((len(prompts), *policy.latent_shape), generator=torch.Generator().manual_seed(seed))
    sigmas = flux_sigmas(num_steps, shift).to(device)  # [T + 1]
    x0 = sample_euler(lambda x, sigma: policy.velocity(x, sigma, cond), noise.to(device), sigmas)  # [N, 1, H, W]
    return policy.decode(x0)  # [N, 3, H, W]
