"""The training demo's data: the default "thin" setting (``synthetic_thin.py``: 5 classes told
apart by weak local colour and texture, many thin structures) or the harder "shapes" setting
(``synthetic_shapes.py``: 21 classes, identity set by global shape).

``load_data`` returns ``{"train", "val", "test"}`` splits ``(images float32 [N, 3, S, S],
labels uint8 [N, S, S], thin bool [N, S, S])`` plus ``num_classes``, ``class_names`` and
``palette``. The splits use fixed seeds (0, 10 000, 20 000), the same for every training seed.
"""
from __future__ import annotations

import synthetic_shapes as shapes
import synthetic_thin as thin

SPLIT_SEEDS = {"train": 0, "val": 10_000, "test": 20_000}


def shapes_thin_mask(labels):
    """Bool mask of the shapes data set's thin structures: rings and lines."""
    classes = [shapes.class_of(shapes.KINDS.index(k), c)
               for k in ("ring", "line") for c in range(len(shapes.COLOURS))]
    mask = labels == classes[0]
    for c in classes[1:]:
        mask |= labels == c
    return mask


def make_split(kind, n, size, seed):
    if kind == "thin":
        return thin.make_dataset(n, size, seed=seed)
    x, y = shapes.make_dataset(n, size, seed=seed)
    return x, y, shapes_thin_mask(y)


def load_data(kind, size, n_train, n_val, n_test) -> dict:
    counts = {"train": n_train, "val": n_val, "test": n_test}
    data = {split: make_split(kind, counts[split], size, SPLIT_SEEDS[split]) for split in counts}
    module = thin if kind == "thin" else shapes
    data.update(num_classes=module.NUM_CLASSES, class_names=module.CLASS_NAMES,
                palette=module.palette())
    return data
