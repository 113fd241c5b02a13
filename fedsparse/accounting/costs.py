"""What a client pays, as formulas: encoder compute, storage, tensor memory. No Flower.

Every function here is *analytic* (computed from shapes); ``fedsparse bench`` puts each
figure next to its measured counterpart (a FLOP counter, a timer, process RSS, the
serialized Flower messages) and labels which is which.

Multiply-accumulates (MACs) of one timm ViT block on ``n`` tokens of width ``d`` with MLP
ratio ``m`` (He et al.'s MAE encoder, Dosovitskiy et al.'s ViT)::

    qkv 3nd^2 + scores n^2 d + weighted values n^2 d + proj nd^2 + MLP 2m nd^2
    = (4 + 2m) n d^2 + 2 n^2 d

plus the patch embedding of the visible patches, ``n_visible * (C p^2) * d``. Norms,
softmax and GELU are not MACs and are left out, as FLOP counters do. At mask ratio r only
``n = 1 + num_visible(N, r)`` tokens enter the blocks, so the work falls a little faster
than ``1 - r`` (the attention term is quadratic).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsparse.inputs.masking import num_visible

BYTES_PER_FP32 = 4
BYTES_PER_PIXEL_VALUE = 1  # 8-bit images


@dataclass(frozen=True)
class ViTShape:
    """What the MAC count needs from a ViT encoder."""

    image_size: int
    patch_size: int
    dim: int
    depth: int
    mlp_ratio: float = 4.0
    channels: int = 3
    prefix_tokens: int = 1  # CLS (+ registers)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def of(cls, model, image_size: int) -> "ViTShape":  # model: fedsparse.inputs.vit.ViT or timm's ViT
        """The shape of a ViT (``fedsparse.inputs.vit.ViT`` or timm's ``VisionTransformer``)."""
        block = model.blocks[0]
        hidden = block.mlp.fc1.out_features
        return cls(
            image_size=image_size,
            patch_size=int(model.patch_embed.patch_size[0]),
            dim=int(model.embed_dim),
            depth=len(model.blocks),
            mlp_ratio=hidden / int(model.embed_dim),
            prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
        )


def encoder_macs(shape: ViTShape, mask_ratio: float) -> int:
    """Analytic MACs of one image's visible-patch forward up to the CLS token (formula above)."""
    visible = num_visible(shape.num_patches, mask_ratio)
    n, d = visible + shape.prefix_tokens, shape.dim
    hidden = int(round(shape.mlp_ratio * d))
    per_block = 4 * n * d * d + 2 * n * d * hidden + 2 * n * n * d
    embed = visible * shape.channels * shape.patch_size**2 * d
    return shape.depth * per_block + embed


def masked_images_bytes(num_images: int, shape: ViTShape, mask_ratio: float) -> int:
    """Storage of the masked training images: the 8-bit pixels of their visible patches only."""
    per_image = num_visible(shape.num_patches, mask_ratio) * shape.patch_size**2 * shape.channels
    return num_images * per_image * BYTES_PER_PIXEL_VALUE


def cls_cache_bytes(num_images: int, dim: int) -> int:
    """Tensor bytes of the cached fp32 CLS vectors (the cache file adds labels and a header)."""
    return num_images * dim * BYTES_PER_FP32


def head_train_tensor_bytes(dims: tuple[int, ...] | list[int], batch_size: int) -> int:
    """Tensor memory of local head training in fp32: weights, gradients and Adam's two moments
    (4 x parameters), plus the activations kept for backward (batch x sum of layer widths)."""
    params = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    return BYTES_PER_FP32 * (4 * params + batch_size * sum(dims))


def extraction_tensor_bytes(shape: ViTShape, mask_ratio: float, batch_size: int, chunk: int) -> int:
    """Tensor memory of feature extraction in fp32: the encoder's weights, a decoded chunk of
    images (twice: raw and normalised), and the widest activations of one block on a batch
    (MLP hidden plus attention scores)."""
    d, hidden = shape.dim, int(round(shape.mlp_ratio * shape.dim))
    weights = shape.depth * (4 * d * d + 2 * d * hidden) + shape.num_patches * d
    pixels = 2 * chunk * shape.channels * shape.image_size**2
    n = num_visible(shape.num_patches, mask_ratio) + shape.prefix_tokens
    heads = max(1, d // 64)
    activations = batch_size * (n * (hidden + 4 * d) + heads * n * n)
    return BYTES_PER_FP32 * (weights + pixels + activations)
