"""The MAE ViT encoder, run on the visible patches only.

``visible_cls(model, images, keep)`` patchifies the images, embeds **only the kept patches**
(the patch-embedding convolution applied as a matrix product to the gathered patches),
adds their position embeddings, prepends the CLS token with its own, and runs the blocks
and the final norm on ``1 + n_visible`` tokens. No attention masks: the work shrinks with
the number of visible tokens. At mask ratio 0 it equals timm's ``forward_features(x)[:, 0]``.

Encoders come from a spec string (the ``encoder`` run-config key):

- ``builtin``: a small ViT (patch 4, dim 192, depth 6, 3 heads) for 32x32 inputs, pretrained
  as an MAE on CIFAR-10 by ``fedsparse pretrain`` and bundled (``BUILTIN_WEIGHTS``, fp16, 5.4 MB).
- ``builtin-random``: the same architecture with a fixed random initialisation (a warning says
  so), at any image size that is a multiple of 4; the baseline the pretrained one must beat.
  These two and checkpoint files are fedsparse's own ViT (``fedsparse.inputs.vit``: timm's
  ``VisionTransformer``, bit for bit, without importing timm); the timm specs below import timm.
- ``<timm model name>``, e.g. ``vit_base_patch16_224.mae``: timm architecture with hub weights.
- ``<timm model name>@<file>``: the same architecture, weights from a local file, loaded by
  timm's own pretrained-weights code path (what the hub path runs after downloading).
- ``<timm model name>@random``: the architecture with a fixed random initialisation (seed
  ``BUILTIN_SEED``, a warning says so), nothing fetched; for speed and memory benchmarks.
- ``<file>`` (``.pth``, ``.pt``, ``.bin``, ``.safetensors``): a checkpoint; the architecture
  is read from fedsparse metadata in the file or inferred from the tensor shapes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import torch
from torch import nn

log = logging.getLogger("fedsparse")

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
BUILTIN_ARCH = {"patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0}
BUILTIN_SEED = 0
RANDOM_SUFFIX = "@random"  # "<timm name>@random": random weights, no download
BUILTIN_WEIGHTS = "builtin-vit-mae-cifar10.pth"  # in fedsparse/assets; see README "Encoders"
PREPROCESS_STATS = {
    "paper": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class Encoder:
    """A loaded encoder and what identifies it.

    Attributes:
        model: a ViT in eval mode (``fedsparse.inputs.vit.ViT``, or timm's ``VisionTransformer``
            for a hub model).
        spec: the spec string it was built from.
        weights_sha: SHA-256 of its parameters and buffers (first 16 hex digits).
        image_size: input side in pixels; patch_size, num_patches, dim: as the names say.
    """

    model: nn.Module
    spec: str
    weights_sha: str
    image_size: int
    patch_size: int
    num_patches: int
    dim: int

    @property
    def identity(self) -> dict[str, Any]:
        return {"spec": self.spec, "weights": self.weights_sha, "image_size": self.image_size, "dim": self.dim}


def _vit(img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0) -> nn.Module:
    """The ViT of the built-in encoder and of checkpoint files: fedsparse's own
    (``fedsparse.inputs.vit``: timm's ``VisionTransformer`` without importing timm)."""
    from fedsparse.inputs.vit import ViT

    return ViT(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
               mlp_ratio=mlp_ratio)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in key order (first 16 hex digits)."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def build_builtin(image_size: int = 32) -> nn.Module:
    """The built-in small ViT with its fixed random initialisation (seed ``BUILTIN_SEED``)."""
    if image_size % BUILTIN_ARCH["patch_size"]:
        raise ValueError(f"image-size {image_size} must be a multiple of the builtin patch size 4")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILTIN_SEED)
        return _vit(image_size, **BUILTIN_ARCH)


def load_failure_reason(err: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` (or safetensors) could not read a file, in a
    few words. Never torch's advice to retry with ``weights_only=False``: that would run
    whatever code the file holds."""
    text = str(err)
    if isinstance(err, EOFError) or not text.strip():
        return f"the file is empty or truncated ({type(err).__name__})"
    if "Weights only load failed" in text or "weights_only" in text:
        # keep only the unpickler's own reason, e.g. "Unsupported operand 26" or "Unsupported global: ..."
        detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
        detail = next((ln.strip() for ln in detail.splitlines() if ln.strip()), "")
        detail = detail.split(". ")[0].rstrip(".")
        return "not a checkpoint of plain tensors" + (f" ({detail})" if detail else "")
    if "zip archive" in text or "central directory" in text:
        return "not a readable PyTorch checkpoint (a corrupt or truncated zip archive)"
    if type(err).__module__.startswith("safetensors"):
        return f"not a readable safetensors file ({' '.join(text.split())[:200]})"
    return f"not a PyTorch checkpoint ({type(err).__name__}: {' '.join(text.split())[:200]})"


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, fedsparse metadata or {}) from a .pth/.pt/.bin/.safetensors file."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
            arch = json.loads(meta["fedsparse_arch"]) if "fedsparse_arch" in meta else {}
            return load_file(str(path)), arch
        except Exception as err:  # noqa: BLE001 - safetensors and json raise their own kinds
            raise ValueError(f"cannot read checkpoint {path}: {load_failure_reason(err)}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds here
        raise ValueError(f"cannot read checkpoint {path}: {load_failure_reason(err)}") from None
    arch: dict[str, Any] = {}
    if isinstance(obj, dict) and "fedsparse_arch" in obj:
        arch = dict(obj["fedsparse_arch"])
    for key in ("model", "state_dict", "encoder"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path} holds no state dict of tensors")
    return obj, arch


def infer_vit_arch(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """ViT hyper-parameters from tensor shapes (heads: 64-wide, except 1280 -> 16 as ViT-H)."""
    try:
        proj = state["patch_embed.proj.weight"]  # (D, 3, p, p)
        pos = state["pos_embed"]  # (1, 1 + N, D)
    except KeyError as err:
        raise ValueError(f"checkpoint has no ViT encoder key {err.args[0]!r}") from None
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    n = int(pos.shape[1]) - 1
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"pos_embed has {n + 1} rows; expected 1 + a square number of patches")
    block_ids = [int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()]
    depth = 1 + max(block_ids) if block_ids else 0
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0]) if "blocks.0.mlp.fc1.weight" in state else 4 * dim
    heads = 16 if dim == 1280 else max(1, dim // 64)
    return {"img_size": side * patch, "patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": heads, "mlp_ratio": hidden / dim}


ENCODER_KEY_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "reg_token")
DROPPED_KEYS = ("decoder", "mask_token", "head.", "fc_norm.")


def _encoder_state(p: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A checkpoint file's encoder tensors (``module.`` prefixes and the decoder dropped, every
    weight finite) and its architecture (given, or inferred from the shapes); a missing file or
    a folder is a one-line error."""
    if p.is_dir():
        raise ValueError(f"encoder {p} is a folder; give a checkpoint file (.pth, .pt, .bin, .safetensors)")
    if not p.is_file():
        raise FileNotFoundError(f"encoder checkpoint not found: {p}")
    state, arch = _read_checkpoint(p)
    check_finite(state, f"encoder checkpoint {p}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(DROPPED_KEYS)}
    return state, arch or infer_vit_arch(state)


def load_checkpoint(path: str | Path) -> nn.Module:
    """A ViT encoder from a checkpoint; missing or mis-shaped encoder keys are an error."""
    p = Path(path).expanduser()
    state, arch = _encoder_state(p)
    model = _vit(**arch)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {p} does not match a ViT encoder: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"checkpoint {p}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model


def checkpoint_of(spec: str) -> Path | None:
    """The checkpoint file an encoder spec loads its weights from (``builtin``: the bundled one;
    a path: that file), or None for a spec that timm builds (a hub name, ``name@file``,
    ``@random``, ``builtin-random``). Mirrors ``load_encoder``'s order of cases."""
    spec = spec.strip()
    if spec == "builtin":
        from fedsparse.resources import asset_path

        return asset_path(BUILTIN_WEIGHTS)
    if spec == "builtin-random" or spec.endswith(RANDOM_SUFFIX) or "@" in spec:
        return None
    if spec.endswith(CHECKPOINT_SUFFIXES) or "/" in spec or spec.startswith("~") or Path(spec).exists():
        return Path(spec).expanduser()
    return None


def builds_with_timm(spec: str) -> bool:
    """Whether ``load_encoder(spec)`` imports timm: a hub model by name (``name``,
    ``name@file``, ``name@random``). The built-in encoders and checkpoint files are
    ``fedsparse.inputs.vit.ViT``."""
    spec = spec.strip()
    return spec != "builtin-random" and checkpoint_of(spec) is None


def checkpoint_identity(spec: str, image_size: int) -> tuple[dict[str, Any], dict[str, Any], int] | None:
    """(identity, arch, parameter count) of the encoder ``spec`` names, read from its checkpoint
    file without building the model (no timm), or None when timm builds it (``checkpoint_of``).

    The identity is the one ``load_encoder(spec, image_size).identity`` gives (the digest is
    ``weights_digest`` over the same tensors, cast as loading casts them), so feature-cache
    entries keep their names; the file's errors (missing, unreadable, NaN weights, not a ViT,
    another image size) are the same one-line errors as ``load_encoder``'s."""
    path = checkpoint_of(spec)
    if path is None:
        return None
    state, arch = _encoder_state(path)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    if "cls_token" not in state:
        raise ValueError(f"encoder {spec.strip()!r} has no CLS token; fedsparse needs a ViT with class token")
    if spec.strip() == "builtin" and image_size != 32:
        raise ValueError(f"encoder 'builtin' is pretrained at 32x32, not {image_size}; "
                         "use image-size = 32, or 'builtin-random' for other sizes")
    if int(arch["img_size"]) != image_size:
        raise ValueError(f"encoder {spec.strip()!r} takes {arch['img_size']}x{arch['img_size']} images but image-size is {image_size}")
    h = hashlib.sha256()
    for key, t in sorted(state.items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    identity = {"spec": spec.strip(), "weights": h.hexdigest()[:16], "image_size": image_size,
                "dim": int(arch["embed_dim"])}
    return identity, dict(arch), sum(int(t.numel()) for t in state.values())


def check_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    """A one-line ``ValueError`` naming ``what`` and its first tensors that hold NaN or Inf."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{what} holds NaN or Inf weights in {len(bad)} tensor(s): "
                         f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}")


def save_checkpoint(model: nn.Module, path: str | Path, half: bool = False) -> None:
    """Save an encoder with its architecture, loadable by ``load_checkpoint`` / ``encoder = <path>``.

    ``half=True`` stores the weights as fp16 (half the size); loading casts them back to fp32.
    """
    pe = model.patch_embed
    arch = {
        "img_size": int(pe.img_size[0]),
        "patch_size": int(pe.patch_size[0]),
        "embed_dim": int(model.embed_dim),
        "depth": len(model.blocks),
        "num_heads": int(model.blocks[0].attn.num_heads),
        "mlp_ratio": model.blocks[0].mlp.fc1.out_features / model.embed_dim,
    }
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"fedsparse_arch": arch, "model": state}, Path(path))


def _create_timm(name: str, image_size: int, weights_file: str | None, random_init: bool = False) -> nn.Module:
    import timm

    if name not in timm.list_models(pretrained=True) and name not in timm.list_models():
        raise ValueError(
            f"Unknown encoder {name!r}: not 'builtin', not a timm model name, not a checkpoint file"
        )
    kwargs: dict[str, Any] = {"pretrained": not random_init, "num_classes": 0, "img_size": image_size}
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BUILTIN_SEED)
            return timm.create_model(name, **kwargs)
    if weights_file is not None:
        if not Path(weights_file).expanduser().is_file():
            raise FileNotFoundError(f"encoder weights file not found: {weights_file}")
        kwargs["pretrained_cfg_overlay"] = {"file": str(Path(weights_file).expanduser()), "hf_hub_id": None, "url": None}
    try:
        return timm.create_model(name, **kwargs)
    except Exception as err:  # noqa: BLE001 - timm, torch and safetensors raise many kinds here
        if weights_file is not None:
            raise ValueError(f"cannot load weights {weights_file} into {name}: {load_failure_reason(err)}") from None
        if not isinstance(err, (OSError, RuntimeError)):
            raise
        raise ValueError(
            f"cannot fetch hub weights for {name!r} ({type(err).__name__}); offline choices: "
            f"encoder = 'builtin', a checkpoint file, or '{name}@<local weights file>'"
        ) from None


def load_encoder(spec: str, image_size: int) -> Encoder:
    """Build the encoder named by ``spec`` (see the module docstring) in eval mode."""
    spec = spec.strip()
    if spec == "builtin":
        from fedsparse.resources import asset_path

        if image_size != 32:
            raise ValueError(f"encoder 'builtin' is pretrained at 32x32, not {image_size}; "
                             "use image-size = 32, or 'builtin-random' for other sizes")
        model = load_checkpoint(asset_path(BUILTIN_WEIGHTS))
    elif spec == "builtin-random":
        model = build_builtin(image_size)
        warnings.warn(
            "encoder 'builtin-random' has random weights; its features carry little information",
            stacklevel=2,
        )
    elif spec.endswith(RANDOM_SUFFIX):
        model = _create_timm(spec[: -len(RANDOM_SUFFIX)], image_size, None, random_init=True)
        warnings.warn(f"encoder {spec!r} has random weights; use it for speed and memory, not accuracy", stacklevel=2)
    elif "@" in spec:
        name, _, path = spec.partition("@")
        model = _create_timm(name, image_size, path)
    elif spec.endswith(CHECKPOINT_SUFFIXES) or "/" in spec or spec.startswith("~") or Path(spec).exists():
        model = load_checkpoint(spec)
    else:
        model = _create_timm(spec, image_size, None)
    model.eval().requires_grad_(False)
    pe = model.patch_embed
    if int(pe.img_size[0]) != image_size:
        raise ValueError(f"encoder {spec!r} takes {pe.img_size[0]}x{pe.img_size[0]} images but image-size is {image_size}")
    if getattr(model, "cls_token", None) is None:
        raise ValueError(f"encoder {spec!r} has no CLS token; fedsparse needs a ViT with class token")
    check_finite(model.state_dict(), f"encoder {spec!r}")
    return Encoder(
        model=model,
        spec=spec,
        weights_sha=weights_digest(model),
        image_size=image_size,
        patch_size=int(pe.patch_size[0]),
        num_patches=int(pe.num_patches),
        dim=int(model.embed_dim),
    )


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images: [B, C, H, W] -> patches [B, N, C*p*p], row-major patches, (C, p, p) inside."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def visible_tokens(model: nn.Module, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """All output tokens (after the final norm) of a forward over the visible patches only.

    Args:
        model: a ViT with a class token (``fedsparse.inputs.vit.ViT`` or timm's).
        images: [B, C, H, W], normalised.
        keep: [B, n_visible] long, visible patch indices (see ``fedsparse.inputs.masking``).

    Returns:
        [B, n_prefix + n_visible, D]: CLS (and register) tokens first, then the visible patches
        in the order of ``keep``.
    """
    pe = model.patch_embed
    proj: nn.Conv2d = pe.proj
    p = int(pe.patch_size[0])
    patches = patchify(images, p)  # (B, N, C*p*p)
    patches = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # (B, n, C*p*p)
    x = patches @ proj.weight.reshape(proj.out_channels, -1).T  # (B, n, D): the conv on kept patches
    if proj.bias is not None:
        x = x + proj.bias
    x = pe.norm(x)
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    pos = model.pos_embed
    patch_pos = pos if getattr(model, "no_embed_class", False) else pos[:, n_prefix:]
    x = x + torch.gather(patch_pos.expand(x.shape[0], -1, -1), 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    prefix = [model.cls_token]
    if getattr(model, "reg_token", None) is not None:
        prefix.append(model.reg_token)
    prefix_t = torch.cat(prefix, 1)  # (1, n_prefix, D)
    if not getattr(model, "no_embed_class", False):
        prefix_t = prefix_t + pos[:, :n_prefix]
    x = torch.cat([prefix_t.expand(x.shape[0], -1, -1), x], 1)  # (B, n_prefix + n, D)
    x = model.norm_pre(x)
    x = model.blocks(x)
    return model.norm(x)


def visible_cls(model: nn.Module, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """CLS feature after the final norm, from the visible patches only: [B, D]."""
    return visible_tokens(model, images, keep)[:, 0]


def encode(
    encoder: Encoder, images: torch.Tensor, keep: torch.Tensor, dtype: str = "fp32", batch_size: int = 256
) -> torch.Tensor:
    """Batched ``visible_cls`` under ``inference_mode``; ``bf16`` runs under CPU autocast. Returns fp32 [B, D]."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x, k = images[start : start + batch_size], keep[start : start + batch_size]
            if dtype == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out.append(visible_cls(encoder.model, x, k).float())
            else:
                out.append(visible_cls(encoder.model, x, k))
    if not out:
        return torch.empty(0, encoder.dim)
    return torch.cat(out)


def check_output(encoder: Encoder, dtype: str = "fp32") -> None:
    """A one-line ``ValueError`` when the encoder's CLS feature of a plain grey image, all
    patches visible, is not finite (finite weights can still overflow)."""
    images = torch.full((1, 3, encoder.image_size, encoder.image_size), 0.5)
    keep = torch.arange(encoder.num_patches).unsqueeze(0)
    if not bool(torch.isfinite(encode(encoder, images, keep, dtype)).all()):
        raise ValueError(f"encoder {encoder.spec!r} gives NaN or Inf features on a plain test image")


def load_image(path: Path | BinaryIO, image_size: int) -> torch.Tensor | None:
    """An RGB image (a file, or its bytes in a file object) as float [3, S, S] in [0, 1], resized
    (bilinear, antialiased); None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return data.reshape(image_size, image_size, 3).permute(2, 0, 1).float().div_(255)


def normalize(images: torch.Tensor, preprocessing: str) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` with the preset's statistics; images: [B, 3, H, W] in [0, 1]."""
    try:
        mean, std = PREPROCESS_STATS[preprocessing]
    except KeyError:
        raise ValueError(f"Unknown preprocessing {preprocessing!r}; valid: {', '.join(PREPROCESS_STATS)}") from None
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s
