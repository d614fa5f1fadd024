"""The aesthetic head: a stack of linear layers on the L2-normalised CLIP image embedding.

The published LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor,
``sac+logos+ava1-l14-linearMSE.pth``, on OpenAI CLIP ViT-L/14's 768-d embedding) is a state dict
of ``nn.Sequential`` ``layers``::

    layers.0  Linear(768, 1024)     layers.1 Dropout(0.2)
    layers.2  Linear(1024, 128)     layers.3 Dropout(0.2)
    layers.4  Linear(128, 64)       layers.5 Dropout(0.1)
    layers.6  Linear(64, 16)
    layers.7  Linear(16, 1)

with no activation between the layers (the ReLUs are commented out in its ``MLP``; dropout does
nothing at evaluation). Accepted: any ``[prefix.]N.weight``/``[prefix.]N.bias`` keys (layers applied
in order of ``N``) or a single ``weight``/``bias`` (a linear probe), in a safetensors file or a
``torch.save`` file loaded with ``weights_only=True``.
"""

from __future__ import annotations

import os
import re
from typing import Literal

import torch
from safetensors.torch import load_file

__all__ = ["AestheticHead", "load_aesthetic_head", "head_file", "HEAD_SUFFIXES", "HeadActivation"]

HeadActivation = Literal["none", "relu"]
HEAD_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_LAYER_KEY = re.compile(r"^(?:(?P<prefix>.+)\.)?(?P<index>\d+)\.(?P<kind>weight|bias)$")


class AestheticHead(torch.nn.Module):
    """Linear layers ``(in_i, out_i)`` applied in order, ``activation`` between them (not after the
    last); ``forward`` maps ``(..., D)`` embeddings to ``(...)`` scores."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], activation: HeadActivation = "none"):
        super().__init__()
        self.linears = torch.nn.ModuleList()
        for weight, bias in layers:
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
            self.linears.append(linear)
        self.activation = activation
        self.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, linear in enumerate(self.linears):
            if i and self.activation == "relu":
                x = torch.relu(x)
            x = linear(x.to(linear.weight.dtype))
        return x.squeeze(-1)


def load_aesthetic_head(path: str, activation: HeadActivation = "none") -> AestheticHead:
    """The head in ``path`` (``reward.head_path``, absolute). ``ValueError`` naming the key for a file
    that is not a head of this layout."""
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load and safetensors raise many types for a bad file
        raise ValueError(f"reward.head_path: cannot read {path} as a state dict: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"reward.head_path: {path} is not a state dict of tensors")
    layers = _layers(state, path)
    for i, (weight, bias) in enumerate(layers):
        if weight.dim() != 2 or bias.shape != weight.shape[:1]:
            raise ValueError(f"reward.head_path: {path}: layer {i} has weight {tuple(weight.shape)} and bias "
                             f"{tuple(bias.shape)}; not a linear layer")
        if i and weight.shape[1] != layers[i - 1][0].shape[0]:
            raise ValueError(f"reward.head_path: {path}: layer {i} takes {weight.shape[1]} features but layer "
                             f"{i - 1} gives {layers[i - 1][0].shape[0]}")
    if layers[-1][0].shape[0] != 1:
        raise ValueError(f"reward.head_path: {path}: the last layer gives {layers[-1][0].shape[0]} values, not 1 score")
    return AestheticHead([(w.float(), b.float()) for w, b in layers], activation)


def _layers(state: dict, path: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if not state:
        raise ValueError(f"reward.head_path: {path} holds no tensors")
    if set(state) == {"weight", "bias"}:
        return [(state["weight"], state["bias"])]
    found: dict[int, dict[str, torch.Tensor]] = {}
    prefixes = set()
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            raise ValueError(f"reward.head_path: {path}: unexpected key {key!r}; expected layers.N.weight/bias "
                             f"(the LAION aesthetic predictor's MLP) or weight/bias; found {sorted(state)[:8]}")
        prefixes.add(match["prefix"])
        found.setdefault(int(match["index"]), {})[match["kind"]] = value
    if len(prefixes) != 1:
        raise ValueError(f"reward.head_path: {path}: keys of several modules ({sorted(map(str, prefixes))}); "
                         "expected one stack of linear layers")
    layers = []
    for index in sorted(found):
        if set(found[index]) != {"weight", "bias"}:
            raise ValueError(f"reward.head_path: {path}: layer {index} lacks a weight or a bias")
        layers.append((found[index]["weight"], found[index]["bias"]))
    return layers


def head_file(path: str) -> str:
    """``reward.head_path`` checked without reading it: exists, and a suffix this loader reads."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reward.head_path: no such file: {path}")
    if not path.endswith(HEAD_SUFFIXES):
        raise ValueError(f"reward.head_path: {path}: expected a {', '.join(HEAD_SUFFIXES)} file")
    return path
