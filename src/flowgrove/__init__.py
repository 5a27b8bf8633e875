"""flowgrove: GRPO alignment of flow-matching generators (DanceGRPO, Flow-GRPO, MixGRPO, BranchGRPO).

Conventions, fixed once for the whole package:

- ``sigma`` in [0, 1]: 1 is pure noise, 0 is data; ``x_sigma = (1 - sigma) * x0 + sigma * noise``.
- The policy predicts the velocity ``v = noise - x0``. Euler ODE step: ``x + (sigma_next - sigma) * v``.
- The model-facing ``timestep`` (``sigma * 1000`` for FLUX) exists only inside a policy adapter; exact
  sigmas are fed, never quantised.
- One SDE step family: ``mean = x + dt * (v - g**2 / 2 * score)``, ``std = g * sqrt(sigma - sigma_next)``
  with ``g = eta`` (DanceGRPO, BranchGRPO), ``g = a * sqrt(sigma / (1 - sigma))`` (Flow-GRPO, MixGRPO)
  or ``g = 0`` (ODE); and its coefficient-preserving type (CPS, ``sampler.noise=cps``): ``std = g * sigma_next``
  with ``g = sin(eta * pi / 2)``, ``mean = (1 - sigma_next) * x0_pred + sqrt(sigma_next**2 - std**2) * eps_pred``.
- A transition log-probability is a per-sample scalar ``[B]``: the Gaussian log-density averaged over
  every non-batch dimension, always under the std the sample was drawn with.
- Shapes: ``B`` images in a batch, ``G`` images per prompt, ``T`` denoising steps, latents ``[B, *latent_shape]``
  (``[B, C, H, W]``; videos ``[B, C, F, H, W]``).
- Images handed to rewards are float tensors ``[B, 3, H, W]`` (videos ``[B, F, 3, H, W]``) in [0, 1].
"""

import logging as _logging

__version__ = "0.1.0"

# transformers warns, once per image-processor class, that it "requires torchvision (not installed)" and falls back
# to the PIL processor. flowgrove wants that fallback (PyPI's torchvision next to a CPU torch breaks transformers), so
# the two warnings that came before every diffusers-family message are dropped, and nothing else of that logger.
_logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())

# The quantisation libraries (policy.quantize, train.optimizer=adamw8bit) announce, on import, optional native
# kernels this machine does not have; diffusers and peft import them whenever they are installed, so every command
# printed four lines that say nothing about the run. The pure-torch paths they fall back to are the ones used here.
# Only these messages of these loggers are dropped.
_QUIET = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "torchao": "Failed to load ",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
    "torch.utils._pytree": "is an Enum subclass and is now natively supported",
}
for _name, _text in _QUIET.items():
    _logging.getLogger(_name).addFilter(lambda record, text=_text: text not in record.getMessage())
