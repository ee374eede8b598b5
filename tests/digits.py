"""scikit-learn's digits (shipped inside its wheel) written as the datasets users have."""
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
from PIL import Image

CLASS_NAMES = [f'digit_{i}' for i in range(10)]


def digits_arrays(size: int = 32):
    """Images as uint8 RGB arrays upscaled to ``size`` px, and their labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    images = [np.asarray(Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR))
              for img in d.images]
    rgb = np.stack([np.repeat(img[..., None], 3, axis=2) for img in images])
    return rgb, d.target.astype(np.int64)


def write_image_folder(root: Path, images: np.ndarray, labels: Sequence[int], fmt: str = 'png') -> Path:
    """One subfolder per class, as ``load_dataset('imagefolder')`` reads it."""
    root = Path(root)
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / CLASS_NAMES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f'{i:05d}.{fmt}')
    return root


def split_indices(labels: np.ndarray, per_class: int, n_test: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """A stratified labeled split of ``per_class`` images per class, a test split, and the rest."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    labeled = np.concatenate([order[labels[order] == c][:per_class] for c in range(10)])
    rest = np.setdiff1d(order, labeled)
    rest = rest[rng.permutation(len(rest))]
    return {'labeled': np.sort(labeled), 'test': np.sort(rest[:n_test]), 'unlabeled': np.sort(rest[n_test:])}


def write_parquet(path: Path, images: np.ndarray, labels: Optional[Sequence[int]] = None) -> Path:
    """A parquet directory with an ``image`` column (PNG bytes) and a ClassLabel ``label``."""
    import datasets
    features = {'image': datasets.Image()}
    data = {'image': [Image.fromarray(img) for img in images]}
    if labels is not None:
        features['label'] = datasets.ClassLabel(names=CLASS_NAMES)
        data['label'] = [int(x) for x in labels]
    ds = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path / 'train.parquet'))
    return path
