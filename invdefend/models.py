"""Small reference models used by the examples, tests, benchmarks and the demo.

They are ordinary ``torch.nn.Module`` s; invdefend works on any model, these only give every script the
same well-known architectures (the LeNet-style CNN of the gradient-inversion literature, a small
normalisation-free ResNet, an MLP).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet", "MLP", "SmallResNet", "SplitModel", "make_activation", "uniform_init_"]


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module by name (``"sigmoid"``, ``"relu"``, ``"tanh"``)."""
    table = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
    if name not in table:
        raise ValueError(f"invdefend.models: unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]()


class LeNet(nn.Module):
    """The LeNet-style CNN of DLG (Zhu et al., 2019): three 5x5 convolutions and one linear layer.

    Args:
        in_channels: input channels (3 for RGB, 1 for digits).
        image_size: side of the square input (32 for CIFAR-sized patches, 8 for digits).
        num_classes: output classes.
        width: channels of every convolution (12 in the paper).
        activation: ``"sigmoid"`` (the paper's, easiest to invert) or ``"relu"``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        width: int = 12,
        activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"invdefend.models.LeNet: image_size={image_size} is too small; use >= 4")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=5, padding=2, stride=2),
            make_activation(activation),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=2),
            make_activation(activation),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=1),
            make_activation(activation),
        )
        side = (image_size + 1) // 2
        side = (side + 1) // 2
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch ``(B, C, H, W)``."""
        return self.classifier(self.features(x).flatten(1))


class SmallCNN(nn.Module):
    """conv(``in_channels``→``width``, 3x3) → ReLU → 2x2 max-pool → linear: a tiny CNN for the examples'
    federated and data-parallel runs (1,370 parameters on 8x8 digits at the defaults).

    Args:
        in_channels: input channels (1 for digits).
        image_size: side of the square input (even).
        num_classes: output classes.
        width: channels of the convolution.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        if image_size < 2 or image_size % 2:
            raise ValueError(f"invdefend.models.SmallCNN: image_size={image_size} must be even and >= 2")
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(width * (image_size // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch ``(B, C, H, W)``."""
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """A ResNet basic block without normalisation: ``act(conv2(act(conv1(x))) + skip(x))``.

    Both convolutions are 3x3; the first has stride ``stride``. The skip is the identity when the shape is
    kept, else a 1x1 convolution with the same stride (projection).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act2 = make_activation(activation)
        self.skip: nn.Module = (
            nn.Identity() if stride == 1 and in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1, stride=stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output ``(B, out_channels, H', W')``."""
        return self.act2(self.conv2(self.act1(self.conv1(x))) + self.skip(x))


class SmallResNet(nn.Module):
    """A small ResNet-style CNN: 3x3 stem conv → ``blocks`` basic blocks of ``width`` channels → ``blocks``
    basic blocks of ``2·width`` channels, the first of them downsampling (stride 2, 1x1 projection skip) →
    global average pool → linear (42,986 parameters on 3x32x32 at the defaults).

    No BatchNorm: it couples the samples of a batch, so each sample's gradient would not be a function of
    that sample alone (the defense's per-sample Jacobians, ``torch.func``, Opacus). The residual branches
    are plain convolutions at PyTorch's default initialisation.

    Args:
        in_channels: input channels (3 for RGB, 1 for digits).
        image_size: side of the square input (>= 2; global pooling makes any size work, it is checked only).
        num_classes: output classes.
        width: channels of the stem and the first stage (the second stage has ``2·width``).
        blocks: basic blocks per stage (two stages).
        activation: ``"relu"`` (default), ``"sigmoid"`` or ``"tanh"``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        width: int = 16,
        blocks: int = 2,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if image_size < 2:
            raise ValueError(f"invdefend.models.SmallResNet: image_size={image_size} is too small; use >= 2")
        if blocks < 1 or width < 1:
            raise ValueError(f"invdefend.models.SmallResNet: blocks={blocks} and width={width} must be >= 1")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), make_activation(activation))
        stage1 = [BasicBlock(width, width, 1, activation) for _ in range(blocks)]
        stage2 = [BasicBlock(width, 2 * width, 2, activation)]
        stage2 += [BasicBlock(2 * width, 2 * width, 1, activation) for _ in range(blocks - 1)]
        self.stages = nn.Sequential(nn.Sequential(*stage1), nn.Sequential(*stage2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch ``(B, C, H, W)``."""
        return self.classifier(self.pool(self.stages(self.stem(x))).flatten(1))


class MLP(nn.Module):
    """A fully-connected network on flattened inputs.

    Args:
        in_features: flattened input size.
        hidden: sizes of the hidden layers.
        out_features: output size (classes, or the embedding size of a split-learning bottom model).
        activation: hidden activation name.
        final_activation: whether to apply the activation after the last layer too (embeddings).
    """

    def __init__(
        self,
        in_features: int,
        hidden: tuple[int, ...] = (64,),
        out_features: int = 10,
        activation: str = "relu",
        final_activation: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), make_activation(activation)]
            prev = h
        layers.append(nn.Linear(prev, out_features))
        if final_activation:
            layers.append(make_activation(activation))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs for a batch of inputs of any shape ``(B, ...)`` (flattened internally)."""
        return self.net(x)


class SplitModel(nn.Module):
    """A split-learning pair: a client ``bottom`` that produces the embedding and a server ``top``."""

    def __init__(self, bottom: nn.Module, top: nn.Module) -> None:
        super().__init__()
        self.bottom = bottom
        self.top = top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``top(bottom(x))``."""
        return self.top(self.bottom(x))


@torch.no_grad()
def uniform_init_(model: nn.Module, scale: float = 0.5, generator: torch.Generator | None = None) -> nn.Module:
    """Initialise every weight and bias uniformly in ``[-scale, scale]`` (DLG's setting); returns the model."""
    for p in model.parameters():
        p.uniform_(-scale, scale, generator=generator)
    return model
