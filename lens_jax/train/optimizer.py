"""AdamW with warmup, schedule and global-norm clipping, from config.optimizer."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    lr, warmup = float(opt_cfg.lr), int(opt_cfg.warmup_steps)
    if opt_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif opt_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    else:
        raise ValueError(f"config.optimizer.schedule={opt_cfg.schedule!r}; expected 'constant' or 'cosine'")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _decay_mask(params):
    """Weight decay on matrices ('kernel' leaves) only, never on norms or biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "kernel" in jax.tree_util.keystr(path), params)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    parts = []
    if float(opt_cfg.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(opt_cfg.grad_clip)))
    parts.append(
        optax.adamw(schedule, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps),
                    weight_decay=float(opt_cfg.weight_decay), mask=_decay_mask)
    )
    return optax.chain(*parts)
