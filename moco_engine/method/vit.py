"""The Vision Transformer of MoCo v3 (Chen, Xie & He 2021), registered as ``vit_tiny``,
``vit_small`` and ``vit_base``.

It follows moco-v3's ``vits.py`` (``VisionTransformerMoCo``) in what it computes and how it is
initialised, and timm's ``VisionTransformer`` in how its parameters are named, so an exported
backbone loads strictly into ``timm.models.vision_transformer.VisionTransformer`` built with the
same ``embed_dim``, ``depth``, ``num_heads``, ``img_size``, ``patch_size`` and ``num_classes=0``:

- a convolutional patch embedding (p x p, stride p), uniform in ±√(6 / (3·p² + D)), zero bias;
  ``model.freeze_patch_embed`` keeps it at its random start (moco-v3's ``stop_grad_conv1``);
- a class token initialised N(0, 1e-6²);
- the fixed 2-D sin-cos position table of ``build_2d_sincos_position_embedding`` (its
  ``meshgrid`` in "ij" indexing over (w, h) included), zero for the class token, never trained;
- pre-norm blocks: LayerNorm (eps 1e-6), multi-head attention with a qkv bias, an MLP of ratio
  4 with GELU; xavier-uniform linears with zero bias, qkv initialised as three D x D matrices;
- the class token's output after the final LayerNorm is the feature (width D).

moco-v3's sizes: ViT-Tiny D 192, depth 12, 3 heads; ViT-Small 384, 12, 12 (timm's own
``vit_small`` has 6 heads: this follows moco-v3); ViT-Base 768, 12, 12.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moco_engine.config.schema import ConfigError, ModelConfig
from moco_engine.method.backbones import Backbone, register_backbone

#: (embed_dim D, depth, heads) of each size.
SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 12), "vit_base": (768, 12, 12)}


def sincos_position_table(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """moco-v3's fixed position table (1 + h·w, D), the class token's row zero.

    Each quarter of D is sin or cos of one grid axis at frequencies temperature^(-i / (D/4)):
    [sin(w·ω), cos(w·ω), sin(h·ω), cos(h·ω)], positions in the order of
    ``meshgrid(arange(w), arange(h))`` ("ij" indexing) flattened, as the official code builds it.
    """
    if dim % 4:
        raise ConfigError(f"the ViT's width D={dim} must be divisible by 4 for the 2-D sin-cos position table")
    w, h = torch.meshgrid(torch.arange(grid_w, dtype=torch.float32), torch.arange(grid_h, dtype=torch.float32),
                          indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = w.flatten()[:, None] * omega, h.flatten()[:, None] * omega  # (h·w, D/4)
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])


class PatchEmbed(nn.Module):
    """Images (B, 3, S, S) -> patch tokens (B, (S/p)², D), one p x p stride-p convolution."""

    def __init__(self, img_size: int, patch_size: int, dim: int):
        super().__init__()
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over tokens (B, N, D)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Images (B, 3, S, S) -> the class token's features (B, D)."""

    def __init__(self, img_size: int, patch_size: int, dim: int, depth: int, num_heads: int,
                 freeze_patch_embed: bool = False):
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(f"config key 'model.patch_size' = {patch_size}: must divide the image size {img_size}")
        if dim % num_heads:
            raise ConfigError(f"the ViT's width D={dim} must be divisible by its {num_heads} heads")
        self.embed_dim = dim
        self.patch_embed = PatchEmbed(img_size, patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_position_table(*self.patch_embed.grid_size, dim)[None], requires_grad=False)
        self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.initialise(patch_size)
        if freeze_patch_embed:
            self.patch_embed.proj.requires_grad_(False)

    @torch.no_grad()
    def initialise(self, patch_size: int) -> None:
        """moco-v3's initialisation (``VisionTransformerMoCo.__init__``)."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.endswith("qkv"):  # Q, K and V each a D x D matrix of their own fan
                    bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + self.embed_dim))
        nn.init.uniform_(self.patch_embed.proj.weight, -bound, bound)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.norm(self.blocks(tokens))[:, 0]


def vit(size: str):
    """The builder of ``model.arch=<size>``: images (3, S, S) in patches of ``model.patch_size``."""
    dim, depth, heads = SIZES[size]

    def build(cfg: ModelConfig, input_shape: Any) -> Backbone:
        if not isinstance(input_shape, tuple) or len(input_shape) != 3 or input_shape[0] != 3 or input_shape[1] != input_shape[2]:
            raise ConfigError(f"config key 'model.arch' = {cfg.arch!r}: a ViT takes square RGB images (3, S, S); "
                              f"the data give items of shape {input_shape}")
        return Backbone(VisionTransformer(input_shape[1], cfg.patch_size, dim, depth, heads, cfg.freeze_patch_embed), dim)

    return build


for _size in SIZES:
    register_backbone(_size, vit(_size), reads=("model.patch_size", "model.freeze_patch_embed"))
