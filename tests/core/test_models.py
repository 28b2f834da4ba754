"""The small models the examples and benchmarks share."""

import pytest
import torch

from invdefend.models import SmallCNN


def test_small_cnn_shape_and_parameter_count():
    model = SmallCNN()
    assert sum(p.numel() for p in model.parameters()) == 1370  # the examples' federated / DDP CNN
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert SmallCNN(in_channels=3, image_size=16, num_classes=4, width=2)(torch.rand(2, 3, 16, 16)).shape == (2, 4)


def test_small_cnn_refuses_odd_sizes():
    with pytest.raises(ValueError, match="image_size=7"):
        SmallCNN(image_size=7)
