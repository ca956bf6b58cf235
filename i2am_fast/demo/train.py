"""Trains the demo model on procedural try-on samples (reproducible, CPU-friendly).

    python -m i2am_fast.demo.train --out runs/demo --steps 3000 --checkpoints 0,250,500,1000,2000,3000

The diffusion loss (eq. 2): noise a target latent ``z_0`` to ``z_t``, ask the UNet (given
``z_t``, the masked-person and pose latents and the garment's patch tokens) for the noise, and
take the mean squared error. With probability ``--drop-reference`` the garment tokens are
replaced by zeros, which is the unconditional branch used by classifier-free guidance.
Training samples use seeds from 0 upward; evaluation uses seeds from :data:`HELD_OUT_SEED`
upward, which training never sees. Checkpoints (``step_XXXXXX.safetensors``) are written at
the listed steps, step 0 being the seeded initialisation.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .model import DemoConfig, DemoInpaintingModel
from .sample import make_batch

__all__ = ["train", "HELD_OUT_SEED", "checkpoint_name"]

HELD_OUT_SEED = 1_000_000


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}.safetensors"


def _save(model, path: str) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"format": "i2am_fast demo model"})


def diffusion_loss(model, batch: dict, generator: torch.Generator, drop_reference: float) -> torch.Tensor:
    """The noise-prediction loss on one batch of samples."""
    target = model.codec.encode(batch["target"])
    noise = torch.randn(target.shape, generator=generator)
    steps = model.scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (target.shape[0],), generator=generator)
    noisy = model.scheduler.add_noise(target, noise, t)
    cond = model.conditioning(batch["person"], batch["inpaint_mask"], batch["pose"])
    tokens = model.image_encoder(batch["garment"])
    keep = (torch.rand(target.shape[0], generator=generator) >= drop_reference).float()[:, None, None]
    prediction = model.unet(torch.cat([noisy, cond], dim=1), t, encoder_hidden_states=tokens * keep).sample
    return F.mse_loss(prediction, noise)


def train(out_dir: str, *, steps: int, checkpoints: Sequence[int], batch_size: int = 16, lr: float = 1e-3,
          drop_reference: float = 0.1, seed: int = 0, config: Optional[DemoConfig] = None,
          log: Optional[Callable[[str], None]] = print, log_every: int = 25) -> list[dict]:
    """Trains from the seeded initialisation; returns the loss log (one entry per logged step)."""
    config = config or DemoConfig()
    torch.manual_seed(seed)  # the same initialisation as build_demo_model(seed) without weights
    model = DemoInpaintingModel(config).train()
    os.makedirs(out_dir, exist_ok=True)
    params = list(model.unet.parameters()) + list(model.image_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))  # short warm-up
    generator = torch.Generator().manual_seed(seed + 1)
    wanted = sorted(set(int(c) for c in checkpoints))
    history, smoothed, start = [], None, time.perf_counter()
    if 0 in wanted:
        _save(model, os.path.join(out_dir, checkpoint_name(0)))
    for step in range(1, steps + 1):
        seeds = range((step - 1) * batch_size, step * batch_size)
        batch = make_batch(seeds, config.image_size)
        loss = diffusion_loss(model, batch, generator, drop_reference)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        value = loss.item()
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        if step % log_every == 0 or step == steps:
            entry = {"step": step, "loss": value, "smoothed_loss": smoothed, "seconds": time.perf_counter() - start}
            history.append(entry)
            if log:
                log(f"step {step:6d}/{steps}  loss {value:.4f}  smoothed {smoothed:.4f}  {entry['seconds']:7.1f}s")
        if step in wanted:
            _save(model, os.path.join(out_dir, checkpoint_name(step)))
    with open(os.path.join(out_dir, "train_log.json"), "w") as f:
        json.dump({"steps": steps, "batch_size": batch_size, "lr": lr, "drop_reference": drop_reference,
                   "seed": seed, "checkpoints": wanted, "history": history}, f, indent=1)
    return history


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for checkpoints and train_log.json")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--checkpoints", default="0,250,500,1000,2000,3000", help="comma-separated steps to save")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--drop-reference", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train(args.out, steps=args.steps, checkpoints=[int(c) for c in args.checkpoints.split(",") if c],
          batch_size=args.batch_size, lr=args.lr, drop_reference=args.drop_reference, seed=args.seed)


if __name__ == "__main__":
    main()
