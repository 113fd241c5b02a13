"""The plain ViT encoder of fedsparse's own checkpoints, without timm.

The built-in encoder and every checkpoint file (``fedsparse pretrain``'s, an MAE release) are
this architecture: a patch embedding (a strided convolution), a class token, learned position
embeddings, ``depth`` pre-norm blocks (multi-head self-attention with a fused qkv projection,
then a GELU MLP) and a final LayerNorm (eps 1e-6). Its parameter names, initialisation and
operations are those of timm's ``VisionTransformer(num_classes=0, global_pool="token")``, so a
checkpoint loads into either, a seeded random initialisation gives the same tensors, and the
features are bit for bit the same (``tests/test_encoder.py`` compares the two where timm is
installed).

Importing timm costs 1.5-2 s of CPU and about 190 MiB (it imports torchvision, which imports
``torch._dynamo``): a client that extracts features with the built-in encoder no longer pays
it, and a CPU-only install of torch, where the registry's torchvision does not load, can run
it. timm remains the way to build a hub model by name (``fedsparse.inputs.encoder``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A ViT with a class token and no register tokens (see the module docstring).
    ``forward_features`` is the full (unmasked) forward; fedsparse's masked forward is
    ``fedsparse.inputs.encoder.visible_tokens``."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, in_chans: int = 3) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches + 1, embed_dim))
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.init_weights()

    def init_weights(self) -> None:
        """timm's default ViT initialisation, in its order (so that a seeded RNG gives timm's
        tensors): position embeddings truncated-normal (0.02), the class token normal (1e-6),
        then every Linear, in order, truncated-normal (0.02) with zero bias; the convolution and
        the norms keep their own initialisation from construction."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():  # Linears are leaves: timm's children-first walk meets them in this order
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Every token after the final norm, all patches visible: [B, 1 + N, D]."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return self.norm(self.blocks(self.norm_pre(torch.cat([cls, x], 1))))


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float, bound: float = 2.0) -> torch.Tensor:
    """Normal(0, std) cut to [-bound, bound], by the inverse CDF of a uniform draw: timm's
    ``trunc_normal_`` (one ``uniform_`` from the generator, so a seeded RNG gives timm's
    values; torch's ``nn.init.trunc_normal_`` draws differently)."""
    def cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    lo, hi = cdf(-bound / std), cdf(bound / std)
    tensor.uniform_(2 * lo - 1, 2 * hi - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0))
    return tensor.clamp_(min=-bound, max=bound)
