"""Small reference models used by the examples, tests, benchmarks and the demo.

They are ordinary ``torch.nn.Module`` s; invdefend works on any model, these only give every script the
same well-known architectures (the LeNet-style CNN of the gradient-inversion literature, a small
normalisation-free ResNet, an MLP).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "LeNet", "MLP", "ResNet18", "SmallResNet", "SplitModel", "TextTransformer", "ViT", "digits_cnn", "two_conv_cnn",
    "make_activation", "uniform_init_",
]


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


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"invdefend.models: norm={kind!r}; choose 'batch', 'group' or 'none'")


class NormBlock(nn.Module):
    """ResNet's basic block with normalisation: ``relu(n2(conv2(relu(n1(conv1(x))))) + skip(x))``, the skip a
    1x1 convolution and normalisation when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.n1 = _norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.n2 = _norm(norm, out_channels)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.skip = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                      _norm(norm, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output."""
        return torch.relu(self.n2(self.conv2(torch.relu(self.n1(self.conv1(x))))) + self.skip(x))


class ResNet18(nn.Module):
    """ResNet-18 in its CIFAR layout (He et al., 2016; the 3x3-stem variant used for 32x32 inputs): a 3x3
    stem, four stages of two basic blocks with ``width``, 2, 4 and 8 × ``width`` channels (stride 2 from the
    second on), global average pooling and a linear classifier. 11,173,962 parameters at ``width=64`` with 10
    classes, 701,466 at ``width=16``.

    Args:
        in_channels, num_classes: input channels and classes.
        width: channels of the first stage (64 in the standard model).
        norm: ``"batch"`` (standard), ``"group"`` or ``"none"``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64, norm: str = "batch") -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"invdefend.models.ResNet18: width={width} must be >= 1")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), _norm(norm, width),
                                  nn.ReLU())
        stages, channels = [], width
        for i, out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(NormBlock(channels, out, stride, norm), NormBlock(out, out, 1, norm)))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch ``(B, C, H, W)``."""
        return self.classifier(self.pool(self.stages(self.stem(x))).flatten(1))


class ViT(nn.Module):
    """A Vision Transformer (Dosovitskiy et al., 2021) built on ``nn.TransformerEncoder``: non-overlapping
    ``patch``-sized patches embedded by a strided convolution, a class token, learned positions, ``depth``
    pre-norm encoder layers, a LayerNorm and a linear head on the class token. The defaults are ViT-Tiny's
    width (192, 3 heads, MLP 768, depth 12) on 32x32 inputs with 4x4 patches: 5,362,762 parameters.

    Args:
        image_size, patch, in_channels, num_classes: input geometry and classes.
        dim, depth, heads, mlp: the encoder's width, layers, attention heads and MLP width.
    """

    def __init__(self, image_size: int = 32, patch: int = 4, in_channels: int = 3, num_classes: int = 10,
                 dim: int = 192, depth: int = 12, heads: int = 3, mlp: int = 768) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"invdefend.models.ViT: patch={patch} must divide image_size={image_size}")
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images ``(B, C, H, W)``."""
        h = self.embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        return self.head(self.norm(self.encoder(h))[:, 0])


class TextTransformer(nn.Module):
    """A text classifier on token ids: a token embedding (``self.embed``, the module to name as
    ``embedding_module``) plus learned positions, a stock ``nn.TransformerEncoder`` of ``depth`` layers, mean
    pooling and a linear head (2 layers, width 128, vocabulary 1000, 32 tokens: 529,156 parameters).

    Args:
        vocab, seq_len, num_classes: token vocabulary, sequence length, classes.
        dim, depth, heads, mlp, dropout: the encoder's shape.
    """

    def __init__(self, vocab: int = 1000, seq_len: int = 32, num_classes: int = 4, dim: int = 128, depth: int = 2,
                 heads: int = 4, mlp: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of token ids ``(B, seq_len)``."""
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        return self.head(self.encoder(h).mean(1))


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


def two_conv_cnn(width: int, side: int, classes: int, in_channels: int = 1) -> nn.Module:
    """A small CNN for ``(B, in_channels, side, side)`` inputs: a 3×3 convolution to ``width`` channels, a 3×3
    stride-2 convolution to ``2·width``, ReLU after each, and a linear classifier to ``classes``."""
    half = (side + 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * half * half, classes),
    )


def digits_cnn() -> nn.Module:
    """A small CNN for scikit-learn's ``(B, 1, 8, 8)`` digits (:func:`two_conv_cnn`, 16 and 32 channels) — 9,930
    parameters, about 97.5 % test accuracy."""
    return two_conv_cnn(16, 8, 10)
