"""Optimizer parameter groups (encoder/decoder learning rates, no weight decay on norms and biases) and poly LR."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, lr_encoder: float, lr_decoder: float, weight_decay: float) -> list[dict]:
    """Four groups: {encoder, decoder} x {decayed weights, norm weights and biases (no decay)}.

    Every 1-d parameter is a bias or a norm scale/shift, which CSAIL (and most recipes) leave
    out of weight decay; so are the parameters an encoder lists in `no_weight_decay` (a
    transformer's position embeddings and tables, as timm declares them).
    """
    groups = []
    for part, lr in (("encoder", lr_encoder), ("decoder", lr_decoder)):
        module = getattr(model, part)
        exempt = getattr(module, "no_weight_decay", frozenset())
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name in exempt else decay).append(p)
        groups.append({"name": f"{part}", "params": decay, "lr": lr, "weight_decay": weight_decay})
        groups.append({"name": f"{part}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


class PolySchedule:
    """LR factor at step `it`: (1 - it/horizon)^power, ramped linearly over the first warmup_iters.

    `horizon` starts at the run's iteration count; `train.time_budget_s` moves it as the clock
    runs (see `engine.train.TimeBudget`).
    """

    def __init__(self, iterations: int, power: float = 0.9, warmup_iters: int = 0):
        self.horizon, self.power, self.warmup_iters = int(iterations), float(power), int(warmup_iters)

    def __call__(self, it: int) -> float:
        poly = max(0.0, 1.0 - it / max(self.horizon, 1)) ** self.power
        if it < self.warmup_iters:
            return poly * (it + 1) / self.warmup_iters
        return poly


# train.optimizer -> the optimizer over the parameter groups (each group has its lr and weight decay)
OPTIMIZERS = {
    "sgd": lambda groups, cfg, fused: torch.optim.SGD(groups, lr=cfg.lr_decoder, momentum=cfg.momentum, fused=fused),
    "adamw": lambda groups, cfg, fused: torch.optim.AdamW(groups, lr=cfg.lr_decoder, fused=fused),
}


def build_optimizer(model: torch.nn.Module, train_cfg, fused: bool = False
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """`train.optimizer` (SGD or AdamW) over `param_groups` and the poly schedule. `fused=True`
    (CUDA parameters only, checked at the first step, so the model may move to the GPU after this)
    updates all parameters in one kernel launch."""
    groups = param_groups(model, train_cfg.lr_encoder, train_cfg.lr_decoder, train_cfg.weight_decay)
    optimizer = OPTIMIZERS[train_cfg.optimizer](groups, train_cfg, fused)
    # One schedule object shared by all groups: moving its horizon moves every group's rate.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, PolySchedule(train_cfg.iterations, train_cfg.poly_power, train_cfg.warmup_iters)
    )
    return optimizer, scheduler
