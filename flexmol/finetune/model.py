"""The fine-tuned model: a pre-trained backbone (FlexMol or M2UMol, with LoRA adapters via peft, or
fully trainable) and a task head on the pooled molecule embedding.

Input modes: ``2d`` (the 2D->3D decoder generates the 3D side), ``3d`` (the 3D->2D decoder
generates the 2D side), ``both`` (the two real modalities, decoders skipped). An M2UMol backbone
serves ``2d`` (its 2D-only embedding) and, with a conformer modality, ``3d`` (its 3D encoder).
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


def finetune_modes(shape) -> tuple[str, ...]:
    """The input modes a backbone of ``shape`` (a ``ModelConfig``, or an M2UMol description)
    serves: every mode for FlexMol; for M2UMol ``2d``, and ``3d`` with a conformer modality."""
    from flexmol.model.m2umol import M2UMolModelConfig

    if not isinstance(shape, M2UMolModelConfig):
        return tuple(BATCH_MODALITY)
    return ("2d", "3d") if any(s.kind == "conformer" for s in shape.modalities.values()) else ("2d",)


def with_lora(backbone: FlexMol, r: int, alpha: int, dropout: float, target_modules: list[str]) -> nn.Module:
    """``backbone`` with LoRA adapters on ``target_modules`` and on the modules the backbone names
    in ``lora_modules`` (an M2UMol GraphGPS encoder's projections) (peft); every base weight frozen
    but the modules it names in ``finetune_modules`` (M2UMol's attention over its adapters, which
    pre-training leaves untrained), trained whole and saved with the adapters."""
    from peft import LoraConfig, get_peft_model

    targets = list(dict.fromkeys([*target_modules, *getattr(backbone, "lora_modules", ())]))
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                     modules_to_save=list(getattr(backbone, "finetune_modules", ())) or None)
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


TASK_META = "task.json"


def load_task_model(directory, checkpoint) -> tuple[TaskModel, dict]:
    """A task model saved by :func:`save_task_model`, in eval mode, with its ``task.json``.

    ``checkpoint`` (an export, or a pre-training output_dir holding ``export/``) supplies the
    backbone: with ``adapter/`` its weights, under the adapters loaded by peft
    (``PeftModel.from_pretrained``); with ``model.safetensors`` only its sizes (``model.yaml``),
    every weight then read from the task model. The head's sizes are read from its tensors.
    Nothing is unpickled: safetensors and JSON only. A directory that is not a saved task model,
    or whose weights do not fit ``checkpoint``'s sizes, raises :class:`ConfigError` naming the file.
    """
    import json

    from peft import PeftModel
    from safetensors.torch import load_file

    from flexmol import load_pretrained
    from flexmol.config import ConfigError
    from flexmol.finetune.config import export_dir
    from flexmol.model.export import export_model_config
    from flexmol.model.summary import build_model

    directory = Path(directory)
    meta_file, adapter, full = directory / TASK_META, directory / "adapter", directory / "model.safetensors"
    if not meta_file.is_file() or not (adapter.is_dir() or full.is_file()):
        raise ConfigError(f"{directory}: not a saved task model (it holds {TASK_META} and adapter/ + head.safetensors, "
                          "or model.safetensors, as flexmol finetune writes under runs/MODEL/seedN/model)")
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("targets"), list) \
                or meta.get("task") not in ("classification", "regression"):
            raise ValueError("no targets list or task")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{meta_file}: not a readable task description ({exc})") from None
    export = export_dir(str(checkpoint))

    def read(file: Path) -> dict:
        try:
            return load_file(str(file))
        except Exception as exc:  # noqa: BLE001 -- safetensors' own errors carry no common type
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"{file}: not a readable safetensors file ({first})") from None

    if adapter.is_dir():
        head_file = directory / "head.safetensors"
        if not head_file.is_file():
            raise ConfigError(f"{directory}: adapter/ without head.safetensors")
        head_state = read(head_file)
        prefix = ""
        pretrained = load_pretrained(export)
        try:
            body = PeftModel.from_pretrained(pretrained, str(adapter))
        except Exception as exc:  # noqa: BLE001 -- peft, huggingface_hub and safetensors raise errors of no common type
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"{adapter}: the adapters do not load onto {export} ({first})") from None
        base = body.get_base_model()
    else:
        state = read(full)
        head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        body = base = build_model(export_model_config(export), str(export / "model.yaml"))
        prefix = "head."
    where = full if prefix else directory / "head.safetensors"
    if "0.weight" not in head_state or "3.weight" not in head_state:
        raise ConfigError(f"{where}: no task head ({prefix}0.weight, {prefix}3.weight)")
    hidden, dim = head_state["0.weight"].shape
    if dim != base.cfg.dim:
        raise ConfigError(f"{where}: the head takes {dim}-d embeddings; {export / 'model.yaml'} says dim "
                          f"{base.cfg.dim}")
    model = TaskModel(body, dim, head_state["3.weight"].shape[0], hidden)
    try:
        if prefix:
            model.load_state_dict(state, strict=True)
        else:
            model.head.load_state_dict(head_state, strict=True)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{where}: the weights do not fit the sizes in {export / 'model.yaml'} ({first})") from None
    if model.head[-1].out_features != len(meta["targets"]):
        raise ConfigError(f"{where}: {model.head[-1].out_features} outputs; {meta_file} names "
                          f"{len(meta['targets'])} targets")
    return model.eval(), meta
