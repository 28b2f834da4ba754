"""Data that ships with installed packages: scikit-learn's digits and sample photographs, scikit-image's photographs.

Nothing here downloads anything. Images are returned as float tensors in ``[0, 1]`` (dynamic range 1).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "load_digits_tensors", "natural_image_patches", "digits_split", "PHOTOS", "load_photos", "photo_patches",
    "FACE_LABELS", "load_faces", "face_folds",
]

#: Class names of :func:`load_faces`, by label.
FACE_LABELS: tuple[str, ...] = ("face", "non-face")

#: The RGB photographs shipped by scikit-learn (china, flower) and scikit-image (the rest), in class order.
PHOTOS: tuple[str, ...] = (
    "china", "flower", "astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
    "rocket",
)


def load_digits_tensors(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(1797, 1, 8, 8)`` images in [0, 1] and ``(1797,)`` int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images / 16.0, dtype=dtype).unsqueeze(1)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    return images, labels


def digits_split(
    test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded train/test split of the digits: ``(x_train, y_train, x_test, y_test)``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"invdefend.data.digits_split: test_fraction={test_fraction} must be in (0, 1)")
    x, y = load_digits_tensors(dtype)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def load_faces(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's ``lfw_subset``: 200 grayscale 25x25 crops, 100 faces from Labeled Faces in the Wild
    (label 0) and 100 non-faces (label 1), as ``(200, 1, 25, 25)`` images in [0, 1] and ``(200,)`` labels."""
    from skimage.data import lfw_subset

    images = torch.tensor(np.asarray(lfw_subset(), dtype=np.float64), dtype=dtype).unsqueeze(1)
    labels = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    return images, labels


def face_folds(folds: int = 5, seed: int = 0) -> list[torch.Tensor]:
    """A seeded partition of :func:`load_faces`'s 200 indices into ``folds`` test folds of equal size, each
    holding as many faces as non-faces (stratified), for cross-validated accuracy on so small a set."""
    if folds < 2 or 100 % folds:
        raise ValueError(f"invdefend.data.face_folds: folds={folds} must divide 100 and be >= 2 (e.g. 2, 4, 5)")
    gen = torch.Generator().manual_seed(seed)
    per_class = [torch.randperm(100, generator=gen) + 100 * label for label in (0, 1)]
    parts = [torch.cat([c.reshape(folds, -1)[f] for c in per_class]) for f in range(folds)]
    return [p[torch.randperm(len(p), generator=gen)] for p in parts]


def natural_image_patches(
    n: int,
    size: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    min_std: float = 0.08,
) -> torch.Tensor:
    """``n`` RGB patches ``(n, 3, size, size)`` in [0, 1], cut at seeded random places from the two photos
    scikit-learn ships (``load_sample_images``: china.jpg, flower.jpg), alternating between them.

    Patches are downsampled 4x from a ``4*size`` window so that they hold objects rather than texture,
    and flat patches (per-pixel std below ``min_std``) are skipped.
    """
    from sklearn.datasets import load_sample_images

    if n < 1 or size < 4:
        raise ValueError(f"invdefend.data.natural_image_patches: need n >= 1 and size >= 4, got n={n}, size={size}")
    photos = [np.asarray(img, dtype=np.float64) / 255.0 for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    window = 4 * size
    out: list[np.ndarray] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n:
            raise RuntimeError("invdefend.data.natural_image_patches: could not find enough textured patches")
        photo = photos[len(out) % len(photos)]
        h, w, _ = photo.shape
        top = int(rng.integers(0, h - window))
        left = int(rng.integers(0, w - window))
        crop = photo[top : top + window, left : left + window]
        patch = crop.reshape(size, 4, size, 4, 3).mean(axis=(1, 3))
        if patch.std() < min_std:
            continue
        out.append(patch.transpose(2, 0, 1))
    return torch.tensor(np.stack(out), dtype=dtype)


def load_photos(names: tuple[str, ...] = PHOTOS) -> list[np.ndarray]:
    """The named shipped photographs as float ``(H, W, 3)`` arrays in [0, 1] (nothing is downloaded)."""
    out = []
    for name in names:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            img = load_sample_image(f"{name}.jpg")
        else:
            import skimage.data

            if name not in PHOTOS:
                raise ValueError(f"invdefend.data.load_photos: unknown photo {name!r}; choose from {PHOTOS}")
            img = getattr(skimage.data, name)()
        out.append(np.asarray(img, dtype=np.float64)[..., :3] / 255.0)
    return out


def photo_patches(
    n: int,
    size: int = 32,
    *,
    seed: int = 0,
    part: str = "all",
    photos: tuple[str, ...] = PHOTOS,
    min_std: float = 0.08,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` RGB patches ``(n, 3, size, size)`` in [0, 1] and their photo index ``(n,)`` (a label), cut at
    seeded random places from the shipped photographs, cycling through them.

    Each patch is a ``4·size`` window downsampled 4× (objects rather than texture); flat windows (std below
    ``min_std``) are skipped. ``part="left"`` / ``"right"`` draws windows only from the left / right half of
    every photo, so that two sets drawn from different halves share no pixel (e.g. the attacker's auxiliary
    data and the audited samples).
    """
    if n < 1 or size < 4:
        raise ValueError(f"invdefend.data.photo_patches: need n >= 1 and size >= 4, got n={n}, size={size}")
    if part not in ("all", "left", "right"):
        raise ValueError(f"invdefend.data.photo_patches: part={part!r}; choose 'all', 'left' or 'right'")
    images = load_photos(photos)
    rng = np.random.default_rng(seed)
    window = 4 * size
    xs: list[np.ndarray] = []
    ys: list[int] = []
    attempts = 0
    while len(xs) < n:
        attempts += 1
        if attempts > 200 * n:
            raise RuntimeError("invdefend.data.photo_patches: could not find enough textured patches")
        label = len(xs) % len(images)
        photo = images[label]
        h, w, _ = photo.shape
        lo, hi = {"all": (0, w), "left": (0, w // 2), "right": (w // 2, w)}[part]
        if hi - lo < window or h < window:
            raise ValueError(
                f"invdefend.data.photo_patches: photo {photos[label]!r} ({h}x{w}) is too small for size={size} "
                f"windows in part={part!r}; use a smaller size"
            )
        top = int(rng.integers(0, h - window + 1))
        left = int(rng.integers(lo, hi - window + 1))
        patch = photo[top : top + window, left : left + window].reshape(size, 4, size, 4, 3).mean(axis=(1, 3))
        if patch.std() < min_std:
            continue
        xs.append(patch.transpose(2, 0, 1))
        ys.append(label)
    return torch.tensor(np.stack(xs), dtype=dtype), torch.tensor(ys, dtype=torch.long)
