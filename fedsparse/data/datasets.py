"""Image data sets, their train/test splits, and their partitioning among clients.

Every data set is an :class:`ImageSet`: a root folder, the relative paths of its images
(also their stable ids, from which masks are drawn), integer labels and class names.
Archives (``.tar.gz``) are extracted once into the cache; images are decoded only when a
client extracts its features, and never kept in memory beyond that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from fedsparse.resources import asset_path

log = logging.getLogger("fedsparse")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SAMPLE_ARCHIVE = "cifar10-sample.tar.gz"  # in fedsparse/assets, see fedsparse.resources
TEST_FRACTION = 0.2  # imagefolder without train/ and test/ subfolders
SPLIT_SEED = 1234  # the authors' random_split seed
HUB_CIFAR10 = "uoft-cs/cifar10"  # dataset "cifar10" without data-dir; FEDSPARSE_HUB_CIFAR10 overrides
HUB_CONNECT_TIMEOUT = 5.0  # seconds for the reachability check before the hub loader's own retries
OFFLINE_CHOICES = (
    "offline, set data-dir to a local CIFAR-10 class-folder tree (train/ and test/) or a .tar.gz of it, "
    "or use dataset cifar10-sample"
)

DATASETS = {
    "cifar10-sample": "bundled CIFAR-10 sample (10,000 train / 2,000 test JPEGs), no data-dir needed",
    "cifar10": "CIFAR-10: data-dir holds train/ and test/ class folders or their .tar.gz archives; "
    "empty data-dir = uoft-cs/cifar10 from the hub through flwr-datasets (extra 'hub'), saved once into the cache",
    "imagefolder": "any class-folder tree in data-dir (folder or .tar.gz); train/ and test/ used when present",
    "resisc45": "NWPU-RESISC45 class folders in data-dir, split 27,000/4,500 as the authors' code",
    "aid": "AID class folders in data-dir, split 8,500/1,500 as the authors' code",
}
# The authors' torch.utils.data.random_split(ImageFolder(...), [train, test]) after
# torch.manual_seed(1234); a folder holding a subset is split in the same proportions.
AUTHOR_SPLITS = {"resisc45": (27_000, 4_500), "aid": (8_500, 1_500)}


@dataclass(frozen=True)
class ImageSet:
    """One split of a data set.

    Attributes:
        root: folder the ``paths`` are relative to.
        paths: relative image paths, e.g. ``"train/cat/0001.jpg"``; they are the image ids.
        labels: ``int64 [len(paths)]``.
        classes: class names, index = label.
        fingerprint: identity of the data on disk, part of every feature-cache key.
    """

    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(self.root, tuple(self.paths[i] for i in idx), self.labels[idx], self.classes, self.fingerprint)


def default_cache_dir(cache_dir: str = "") -> Path:
    """``cache_dir``, else ``$FEDSPARSE_CACHE``, else ``$XDG_CACHE_HOME/fedsparse`` (``~/.cache/fedsparse``)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("FEDSPARSE_CACHE"):
        return Path(os.environ["FEDSPARSE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedsparse"


def _file_digest(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished temp folder into place; a concurrent writer that got there first wins."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # lost a race only if the winner finished
            raise


def extract_archive(archive: Path, cache_dir: Path) -> Path:
    """Extract ``archive`` once into ``cache_dir/extracted/<digest>``; safe across processes."""
    target = cache_dir / "extracted" / f"{archive.name.split('.')[0]}-{_file_digest(archive)}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ValueError(f"cannot read archive {archive}: {err}") from None
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _list_class_tree(root: Path) -> tuple[list[str], list[str]]:
    """(class names, relative paths) of a class-folder tree rooted at ``root``."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths: list[str] = []
    for c in classes:
        for dirpath, _, files in os.walk(root / c):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_SUFFIXES):
                    paths.append(str((Path(dirpath) / f).relative_to(root)))
    return classes, paths


def _fingerprint(root: Path, paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = (root / p).stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _loose_images(folder: Path) -> int:
    """Image files directly in ``folder`` (not in a class folder below it)."""
    return sum(1 for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))


def _image_set(root: Path, split_dir: str, name: str) -> ImageSet:
    base = root / split_dir if split_dir else root
    classes, rel = _list_class_tree(base)
    with_images = sorted({Path(p).parts[0] for p in rel})
    if len(with_images) < 2:
        loose = _loose_images(base)
        if with_images:
            raise ValueError(f"{name} at {base} has fewer than 2 classes: only one class folder holds images "
                             f"({with_images[0]}); at least 2 classes (<class>/<image> folders) are needed")
        if loose:
            raise ValueError(f"{name} at {base} has fewer than 2 classes: its {loose} images lie in no class folder; "
                             "at least 2 classes (<class>/<image> folders) are needed")
        raise ValueError(f"no images found under {base} (expected <class>/<image> folders)")
    paths = [str(Path(split_dir) / p) if split_dir else p for p in rel]
    class_index = {c: i for i, c in enumerate(classes)}
    labels = np.array([class_index[Path(p).relative_to(split_dir or ".").parts[0]] for p in paths], dtype=np.int64)
    return ImageSet(root, tuple(paths), labels, tuple(classes), _fingerprint(root, paths))


def _locate_root(data_dir: str, cache_dir: Path, dataset: str) -> Path:
    """A folder for ``data_dir``: itself, or its archive(s) extracted into the cache."""
    if not data_dir:
        raise ValueError(f"dataset {dataset!r} needs data-dir (a class-folder tree or a .tar.gz of one)")
    p = Path(data_dir).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data-dir not found: {p}")
    if p.is_file():
        return extract_archive(p, cache_dir)
    archives = sorted(p.glob("*.tar.gz")) + sorted(p.glob("*.tgz"))
    if archives and not any(d.is_dir() for d in p.iterdir()):
        # a folder of archives (e.g. the train and test archives side by side): merge them
        merged = cache_dir / "extracted" / f"merged-{hashlib.sha256(''.join(_file_digest(a) for a in archives).encode()).hexdigest()[:16]}"
        if not merged.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=_mkdir(merged.parent)))
            for a in archives:
                src = extract_archive(a, cache_dir)
                for child in src.iterdir():
                    os.symlink(child, tmp / child.name)
            try:
                os.rename(tmp, merged)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        return merged
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def check_writable_dir(path: str | Path, key: str) -> Path:
    """``path`` as a folder this process can write into, or a one-line ``ValueError`` naming
    ``key``. Folders created only for the check are removed again."""
    p = Path(path).expanduser()
    existing = next((a for a in (p, *p.parents) if a.exists() or a.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == p else f"lies under {existing}, which is a file"
        raise ValueError(f"{key} {p} {where}, not a folder")
    created = [a for a in (p, *p.parents) if not a.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fedsparse-write-check-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{key} {p} is not writable ({err.strerror or type(err).__name__})") from None
    finally:
        for a in created:  # deepest first; only the empty folders made above
            try:
                a.rmdir()
            except OSError:
                break
    return p


def check_decodable(images: "ImageSet", split: str, sample: int = 8) -> None:
    """A one-line ``ValueError`` when none of up to ``sample`` images spread over ``images``
    can be decoded (single unreadable files are skipped at extraction and counted)."""
    from PIL import Image

    if not len(images):
        return
    picks = sorted({int(i) for i in np.linspace(0, len(images) - 1, min(sample, len(images)))})
    reason = ""
    for i in picks:
        try:
            with Image.open(images.root / images.paths[i]) as im:
                im.load()
            return
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds for a bad file
            reason = reason or f"{images.paths[i]}: {(str(err).splitlines() or [type(err).__name__])[0]}"
    raise ValueError(f"none of {len(picks)} {split} images sampled under {images.root} can be decoded as an image "
                     f"({reason})")


def _unwrap_single_folder(root: Path) -> Path:
    """``archive/RSSCN7/<class>/...`` -> ``archive/RSSCN7``: skip lone wrapper folders
    (a lone ``train/`` too: a training split alone is an image folder to split)."""
    while True:
        entries = [d for d in root.iterdir() if not d.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir() or _loose_images(entries[0]):
            return root  # a lone folder holding images is a class folder, not a wrapper
        root = entries[0]


@lru_cache(maxsize=8)
def load_splits(dataset: str, data_dir: str = "", cache_dir: str = "") -> tuple[ImageSet, ImageSet]:
    """(train, test) splits of ``dataset``. Cached per process: listing a tree is not free."""
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    cache = default_cache_dir(cache_dir)
    if dataset == "cifar10-sample":
        root = extract_archive(asset_path(SAMPLE_ARCHIVE), cache)
    elif dataset == "cifar10" and not data_dir:
        root = hub_image_tree(os.environ.get("FEDSPARSE_HUB_CIFAR10") or HUB_CIFAR10, cache)
    else:
        root = _unwrap_single_folder(_locate_root(data_dir, cache, dataset))
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = _image_set(root, "train", dataset), _image_set(root, "test", dataset)
        if train.classes != test.classes:
            raise ValueError(f"train and test class folders differ under {root}: {train.classes} vs {test.classes}")
        return train, test
    if dataset == "cifar10":
        raise ValueError(f"cifar10 data-dir {root} must hold train/ and test/ class-folder trees")
    full = _image_set(root, "", dataset)
    if dataset in AUTHOR_SPLITS:
        return author_split(full, *AUTHOR_SPLITS[dataset])
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(full))
    n_test = max(1, int(round(len(full) * TEST_FRACTION)))
    return full.subset(np.sort(order[n_test:])), full.subset(np.sort(order[:n_test]))


# --- hub data sets (flwr-datasets), saved once as class folders -------------------------


def hub_image_tree(name: str, cache_dir: Path) -> Path:
    """Hub data set ``name`` as class folders ``<cache>/hub/<slug>/{train,test}/<class>/<row>.<ext>``.

    Loaded through flwr-datasets (imported here only) on the first call and written once,
    atomically (a temporary folder renamed into place); later calls read the folders without
    network. ``name`` is a hub id (``uoft-cs/cifar10``) or the absolute (or ``./``) path of a
    local folder that ``datasets.load_dataset`` reads, e.g. a mirror of the hub repository or an
    image folder with train/ and test/: the same code path.
    Image bytes are copied as stored (PNG for CIFAR-10) where the data set keeps them.
    """
    if _is_local(name):
        local = Path(name).expanduser().resolve()
        slug = f"{local.name}-{hashlib.sha256(str(local).encode()).hexdigest()[:8]}"
    else:
        slug = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in name).strip("-.")
    target = cache_dir / "hub" / slug
    if target.is_dir():
        return target
    hf_cache = _mkdir(cache_dir / "hub") / f".hf-{slug}"  # datasets' own download and Arrow cache
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        splits = load_hub_splits(name, str(hf_cache))
        for split in ("train", "test"):
            if split not in splits:
                raise ValueError(f"hub data set {name} has no {split!r} split (splits: {', '.join(splits)})")
            n = _write_split(splits[split], tmp / split, name)
            log.info("hub %s: wrote %d %s images into the cache", name, n, split)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(hf_cache, ignore_errors=True)  # the class folders are what we keep
    return target


def load_hub_splits(name: str, hf_cache_dir: str):
    """``{"train": Dataset, "test": Dataset}`` of ``name`` through flwr-datasets, unshuffled.

    The one function that touches flwr-datasets, huggingface ``datasets`` and the network
    (``hf_cache_dir`` takes their downloads); errors come back as one-line ``ValueError``s
    naming the offline choices.
    """
    FederatedDataset = _federated_dataset_class(name)  # not installed: say so before anything else
    if not _is_local(name):
        _check_hub_reachable(name)
    fds = FederatedDataset(dataset=name, partitioners={"train": 1}, shuffle=False, cache_dir=hf_cache_dir)
    try:
        return {split: fds.load_split(split) for split in ("train", "test")}
    except Exception as err:
        # ConnectionError (what datasets raises offline), requests' errors and DatasetNotFoundError are
        # OSErrors; httpx's transport errors (huggingface_hub >= 1.0) are not
        if not isinstance(err, OSError) and type(err).__module__.split(".")[0] not in HUB_ERROR_MODULES:
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        cause = f"{type(err).__name__}: {first}"
        raise ValueError(f"cannot load {name} from the hub ({cause}); {OFFLINE_CHOICES}") from None


HUB_ERROR_MODULES = ("httpx", "httpcore", "huggingface_hub", "datasets", "requests", "urllib3", "fsspec", "aiohttp")


def _federated_dataset_class(name: str):
    """flwr-datasets' ``FederatedDataset``, imported only here; one line where it is not installed."""
    try:
        from flwr_datasets import FederatedDataset
    except ImportError:
        raise ValueError(
            f"dataset cifar10 without data-dir loads {name} from the hub through flwr-datasets, which is not "
            f"installed: pip install 'fedsparse[hub]'; {OFFLINE_CHOICES}"
        ) from None
    return FederatedDataset


def _is_local(name: str) -> bool:
    """A local path rather than a hub id (``owner/name``)."""
    return Path(name).expanduser().is_absolute() or name.startswith(("./", "../", "~"))


def _check_hub_reachable(name: str) -> None:
    """Fail in seconds, with one line, where the hub cannot be reached (the hub client would retry
    for about 25 s first). Skipped behind a proxy and in the hub libraries' offline modes."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError as err:
        raise ValueError(f"cannot reach the hub ({host}: {err}) to load {name}; {OFFLINE_CHOICES}") from None


IMAGE_COLUMNS = ("img", "image")  # uoft-cs/cifar10 and datasets' imagefolder


def _write_split(split, out: Path, name: str) -> int:
    """Write every row of a ``datasets.Dataset`` split as ``out/<class>/<idx>.<ext>``."""
    features = split.features
    image_col = next((c for c in IMAGE_COLUMNS if c in features), None)
    names = getattr(features.get("label"), "names", None)
    if image_col is None or not names:
        raise ValueError(
            f"hub data set {name}: expected an image column ({' or '.join(IMAGE_COLUMNS)}) and a class "
            f"'label', got columns {list(features)}"
        )
    if hasattr(split, "cast_column"):  # keep the stored bytes: no decode and re-encode
        from datasets import Image as ImageFeature

        split = split.cast_column(image_col, ImageFeature(decode=False))
    for c in names:
        _mkdir(out / c)
    n = 0
    for idx, row in enumerate(split):
        img, folder = row[image_col], out / names[row["label"]]
        data = img.get("bytes") if isinstance(img, dict) else None
        if data is None and isinstance(img, dict) and img.get("path"):
            data = Path(img["path"]).read_bytes()
        if data is not None:
            ext = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg" if data[:2] == b"\xff\xd8" else None
            if ext is not None:
                (folder / f"{idx:05d}{ext}").write_bytes(data)
                n += 1
                continue
            import io

            from PIL import Image

            img = Image.open(io.BytesIO(data))
        img.convert("RGB").save(folder / f"{idx:05d}.png")
        n += 1
    return n


def author_split(full: ImageSet, n_train: int, n_test: int) -> tuple[ImageSet, ImageSet]:
    """``random_split(full, [n_train, n_test])`` under ``torch.manual_seed(1234)``, as the authors'
    code; when ``full`` is not ``n_train + n_test`` images, the same proportions."""
    import torch

    n = len(full)
    k = n_train if n == n_train + n_test else int(round(n * n_train / (n_train + n_test)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).numpy()
    return full.subset(np.sort(perm[:k])), full.subset(np.sort(perm[k:]))


# --- a client's own data: its class folders, labelled by the run's class list -----------

TEST_FOLDER = "test"  # partitioner = "folders": data-dir/test/ is the server's test set


def parse_classes(text: str) -> tuple[str, ...]:
    """The run-config key ``classes`` (``"airplane,cat,dog"``) as a tuple; ``""`` -> ``()``
    (the run's data set then names the classes). Names must be distinct and non-empty, and
    there must be at least 2."""
    if not text.strip():
        return ()
    names = tuple(c.strip() for c in text.split(","))
    if any(not c for c in names):
        raise ValueError(f"classes {text!r} holds an empty name; give comma-separated class folder names")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise ValueError(f"classes {text!r} names {dupes[0]!r} twice")
    if len(names) < 2:
        raise ValueError(f"classes {text!r} names only one class; a classifier needs at least 2")
    return names


def with_classes(images: ImageSet, classes: Sequence[str], where: str) -> ImageSet:
    """``images`` relabelled by the run's class list (label = index of its class name in
    ``classes``); a class of ``images`` that is not in the list is a one-line ``ValueError``."""
    classes = tuple(classes)
    if images.classes == classes:
        return images
    index = {c: i for i, c in enumerate(classes)}
    present = sorted({images.classes[int(label)] for label in np.unique(images.labels)})
    unknown = [c for c in present if c not in index]
    if unknown:
        raise ValueError(f"{where} has class folder {unknown[0]!r}, which is not one of the run's "
                         f"{len(classes)} classes ({', '.join(classes)})")
    labels = np.array([index[images.classes[int(label)]] for label in images.labels], dtype=np.int64)
    fingerprint = hashlib.sha256(f"{images.fingerprint}|{','.join(classes)}".encode()).hexdigest()[:16]
    return ImageSet(images.root, images.paths, labels, classes, fingerprint)


def own_images(folder: str | Path, classes: Sequence[str], where: str = "data-dir") -> ImageSet:
    """A client's own images: ``folder/<class>/<image>`` (any subset of the run's ``classes``,
    one class is enough), labelled by the index of each class name in ``classes``.

    Its fingerprint covers the folder's resolved path, every image's relative path, size and
    modification time, and the class list, so its feature-cache entry is keyed by the data
    itself (and by the labels), never by a partition id. Errors are one line naming ``where``.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{where} not found: {root}")
    if not root.is_dir():
        raise ValueError(f"{where} {root} is not a folder (expected <class>/<image> folders)")
    _, rel = _list_class_tree(root)
    if not rel:
        loose = _loose_images(root)
        detail = f": its {loose} images lie in no class folder" if loose else ""
        raise ValueError(f"no images found under {where} {root}{detail} (expected <class>/<image> folders)")
    index = {c: i for i, c in enumerate(classes)}
    present = sorted({Path(p).parts[0] for p in rel})
    unknown = [c for c in present if c not in index]
    if unknown:
        raise ValueError(f"{where} {root} has class folder {unknown[0]!r}, which is not one of the run's "
                         f"{len(classes)} classes ({', '.join(classes)})")
    labels = np.array([index[Path(p).parts[0]] for p in rel], dtype=np.int64)
    digest = hashlib.sha256(f"{root.resolve()}|{_fingerprint(root, rel)}|{','.join(classes)}".encode()).hexdigest()[:16]
    return ImageSet(root, tuple(rel), labels, tuple(classes), digest)


@lru_cache(maxsize=4)
def folder_test_set(root: Path) -> ImageSet:
    """``partitioner = "folders"``: the server's test set, ``root/test/<class>/<image>``."""
    return _image_set(root, TEST_FOLDER, "the folders test set")


@lru_cache(maxsize=4)
def client_folders(data_dir: str, cache_dir: str = "") -> tuple[tuple[str, ...], Path]:
    """``partitioner = "folders"``: (names of the client sub-folders of ``data_dir``, sorted;
    the folder that holds them). ``data-dir/test/`` is the server's test set, not a client; a
    ``.tar.gz`` is extracted into the cache first."""
    if not data_dir:
        raise ValueError("partitioner folders needs data-dir: a folder with one sub-folder per client "
                         "(<client>/<class>/<image>) and test/ (the server's test set, <class>/<image>)")
    root = _locate_root(data_dir, default_cache_dir(cache_dir), "folders")
    if not root.is_dir():
        raise ValueError(f"data-dir {root} is not a folder")
    if not (root / TEST_FOLDER).is_dir():
        raise ValueError(f"partitioner folders needs data-dir/{TEST_FOLDER}/ (the server's test set, "
                         f"<class>/<image> folders); {root} has none")
    names = tuple(sorted(d.name for d in root.iterdir()
                         if d.is_dir() and not d.name.startswith(".") and d.name != TEST_FOLDER))
    if not names:
        raise ValueError(f"partitioner folders: data-dir {root} has no client sub-folder besides {TEST_FOLDER}/")
    return names, root


def describe(dataset: ImageSet) -> str:
    counts = np.bincount(dataset.labels, minlength=len(dataset.classes))
    return json.dumps(dict(zip(dataset.classes, counts.tolist())))
