"""The fine-tuned model: a FlexMol backbone (with LoRA adapters via peft, or fully trainable) and a
task head on the pooled molecule embedding.

Input modes: ``2d`` (the 2D->3D decoder generates the 3D side), ``3d`` (the 3D->2D decoder
generates the 2D side), ``both`` (the two real modalities, decoders skipped).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flexmol.model import FlexMol

BATCH_MODALITY = {"2d": "2d", "3d": "3d", "both": "paired"}


class TaskHead(nn.Sequential):
    def __init__(self, dim: int, hidden: int, num_tasks: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_tasks))


class TaskModel(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int, num_tasks: int, hidden: int = 0, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.head = TaskHead(dim, hidden or dim, num_tasks, dropout)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.backbone(batch, decode=False)["embedding"])


def with_lora(backbone: FlexMol, r: int, alpha: int, dropout: float, target_modules: list[str]) -> nn.Module:
    """``backbone`` with LoRA adapters on ``target_modules`` (peft); every base weight frozen."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    try:
        return get_peft_model(backbone, cfg)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora.target_modules {list(target_modules)}: {exc}") from None


def build_task_model(backbone: FlexMol, num_tasks: int, *, lora: bool, r: int = 64, alpha: int = 64,
                     lora_dropout: float = 0.0, target_modules=("qkv", "out", "ffn.0", "ffn.3"),
                     head_hidden: int = 0, head_dropout: float = 0.1) -> TaskModel:
    body = with_lora(backbone, r, alpha, lora_dropout, list(target_modules)) if lora else backbone
    return TaskModel(body, backbone.cfg.dim, num_tasks, head_hidden, head_dropout)


def trainable_state(model: TaskModel) -> dict[str, torch.Tensor]:
    """Copies (on CPU) of the parameters that training changes: adapters and head, or everything."""
    return {k: p.detach().to("cpu", copy=True) for k, p in model.named_parameters() if p.requires_grad}


def save_task_model(model: TaskModel, directory: Path, meta: dict) -> None:
    """Adapters with peft's own format (``adapter/``: safetensors + JSON), the head (and, without
    LoRA, the whole backbone) as safetensors, and ``task.json``; nothing that executes on load."""
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model.backbone, "save_pretrained"):
        model.backbone.save_pretrained(str(directory / "adapter"))
        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, directory / "head.safetensors")
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "task.json").write_text(json.dumps(meta, indent=1) + "\n")
