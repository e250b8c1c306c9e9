"""Visual prompts in input space (U-VPA's idea): the student's weights stay as they are, and a
small learned tensor is added to every input image.

Two kinds, both small enough to ship in a delta:
- `padding`: a learnable frame of width w around the image (four strips);
- `lowres`: a full-image additive prompt at r x r, bilinearly upsampled to the input size.
A prompt starts at zero, so a prompted student is the plain student until the first delta.
Its tensors are named `prompt.<field>` and travel exactly like the BatchNorm tensors: named
ONNX initializers in the side file, replaced by deltas, checked by the same hashes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROMPT_KINDS = ("padding", "lowres")
PREFIX = "prompt"


def parse_prompt(spec: str | None) -> tuple[str, int] | None:
    """'padding:4' -> ('padding', 4), 'lowres:8' -> ('lowres', 8); None or 'none' -> None."""
    if spec is None or spec == "none":
        return None
    kind, _, size = spec.partition(":")
    if kind not in PROMPT_KINDS or not size.isdigit() or int(size) < 1:
        raise ValueError(f"prompt must be padding:WIDTH or lowres:SIZE, got {spec!r}")
    return kind, int(size)


class InputPrompt(nn.Module):
    def __init__(self, kind: str, size: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        height, width = input_size
        if kind not in PROMPT_KINDS:
            raise ValueError(f"unknown prompt kind {kind!r}; choose from {PROMPT_KINDS}")
        if kind == "padding" and not 0 < 2 * size < min(height, width):
            raise ValueError(f"a padding prompt of width {size} does not fit a {height}x{width} image")
        self.kind, self.size, self.input_size = kind, size, (height, width)
        if kind == "padding":
            self.top = nn.Parameter(torch.zeros(1, 3, size, width))
            self.bottom = nn.Parameter(torch.zeros(1, 3, size, width))
            self.left = nn.Parameter(torch.zeros(1, 3, height - 2 * size, size))
            self.right = nn.Parameter(torch.zeros(1, 3, height - 2 * size, size))
        else:
            self.lowres = nn.Parameter(torch.zeros(1, 3, size, size))

    def pattern(self) -> torch.Tensor:
        """The (1, 3, H, W) image the prompt adds."""
        height, width = self.input_size
        if self.kind == "padding":
            inner = torch.zeros(1, 3, height - 2 * self.size, width - 2 * self.size, dtype=self.top.dtype, device=self.top.device)
            middle = torch.cat([self.left, inner, self.right], dim=3)
            return torch.cat([self.top, middle, self.bottom], dim=2)
        return F.interpolate(self.lowres, size=(height, width), mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pattern()


class PromptedModel(nn.Module):
    """prompt -> model: the student a prompted device runs. `.net` and `.mean/.std` pass through."""

    def __init__(self, model: nn.Module, prompt: InputPrompt) -> None:
        super().__init__()
        self.prompt = prompt
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.prompt(x))


def prompt_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The prompt's tensors by their delta names (empty for an unprompted model)."""
    prompt = getattr(model, "prompt", None)
    if not isinstance(prompt, InputPrompt):
        return {}
    return {f"{PREFIX}.{name}": p for name, p in prompt.named_parameters()}
