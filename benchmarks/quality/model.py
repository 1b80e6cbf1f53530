"""The backbone that is merged, the per-task heads that are not, and their files on disk.

Backbone: an MLP on 16x16 pixels (standardised per image), blocks of Linear -> LayerNorm -> GELU
of widths 512, 512, 128 (462K parameters); the 128 features of the last block are what the heads
read. Its tensors are named ``blocks.{i}.fc.weight`` etc., so the tool's
mask statistics group them by block. It is saved as a Hugging Face style folder --
``model.safetensors`` (float32, backbone tensors only) plus our own small ``config.json`` -- so the
CLI merges it like any model. Heads (one Linear per task) are saved separately and never merged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_TYPE = "mlk-bench-backbone"


@dataclass(frozen=True)
class BackboneConfig:
    """Shape of the backbone; written to and read from ``config.json``."""

    input_size: int = 16 * 16
    #: output width of each block; the last one is the feature size the heads read
    widths: tuple[int, ...] = (512, 512, 128)
    model_type: str = MODEL_TYPE

    @property
    def feature_size(self) -> int:
        return self.widths[-1]

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "architectures": ["MlkBenchBackbone"], "dtype": "float32"}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> "BackboneConfig":
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(f"config.json: model_type {data.get('model_type')!r} is not {MODEL_TYPE!r}")
        return cls(input_size=int(data["input_size"]), widths=tuple(int(w) for w in data["widths"]))  # type: ignore[union-attr]


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.norm(self.fc(x)))


class Backbone(nn.Module):
    """Images [N, 16, 16] -> features [N, widths[-1]]."""

    def __init__(self, config: BackboneConfig = BackboneConfig()):
        super().__init__()
        self.config = config
        sizes = [config.input_size, *config.widths]
        self.blocks = nn.ModuleList(Block(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1)
        x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 0.05)  # per-image standardisation
        for block in self.blocks:
            x = block(x)
        return x


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- files -----------------------------------------------------------------------------------------
def save_backbone(backbone: Backbone, folder: Path) -> Path:
    """Write ``folder/model.safetensors`` (float32) and ``folder/config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(backbone.config.to_json(), indent=2) + "\n")
    return folder


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a backbone folder (ours, or a merged one written by mergekit-lite)."""
    return load_file(str(Path(folder) / "model.safetensors"))


def load_backbone(folder: Path) -> Backbone:
    config = BackboneConfig.from_json(json.loads((Path(folder) / "config.json").read_text()))
    return backbone_from_state(read_state(folder), config)


def backbone_from_state(state: Mapping[str, torch.Tensor], config: BackboneConfig = BackboneConfig()) -> Backbone:
    """A backbone holding ``state`` (strict: every tensor present, no extra), in eval mode."""
    backbone = Backbone(config)
    backbone.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return backbone.eval()


def save_head(head: nn.Linear, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(path))


def load_head(path: Path) -> nn.Linear:
    state = load_file(str(path))
    out_features, in_features = state["weight"].shape
    head = nn.Linear(in_features, out_features)
    head.load_state_dict(state)
    return head.eval()
