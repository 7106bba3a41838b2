"""The standard class splits of CIFAR-FS and FC100, shipped as data (no download at run time).

Both are few-shot benchmarks made of CIFAR-100 (Krizhevsky 2009, "Learning Multiple Layers of Features
from Tiny Images"; the images are not shipped here: convert your own copy of the python version). Names
are CIFAR-100's own fine and coarse label names (``meta``: ``fine_label_names``, ``coarse_label_names``).

CIFAR-FS (Bertinetto, Henriques, Torr, Vedaldi, "Meta-learning with differentiable closed-form
solvers", ICLR 2019): 64 / 16 / 20 fine classes, drawn at random by the authors; their split files
(``splits/bertinetto/{train,val,test}.txt``) are distributed with their data, not in the
bertinetto/r2d2 repository. The lists below were transcribed from pytorch-meta
(tristandeleu/pytorch-meta, MIT licence, ``torchmeta/datasets/assets/cifar100/cifar-fs/*.json``), which
reproduces them, and match the split used by MetaOptNet (kjunelee/MetaOptNet, ``data/CIFAR_FS.py``).

FC100 (Oreshkin, Rodríguez López, Lacoste, "TADAM: Task dependent adaptive metric for improved few-shot
learning", NeurIPS 2018): split by superclass, 12 / 4 / 4 superclasses (60 / 20 / 20 fine classes), so
test classes share no superclass with training ones. Transcribed from the same pytorch-meta assets
(``cifar100/fc100/*.json``); the train list matches the superclass labels {1, 2, 3, 4, 5, 6, 9, 10, 15, 17,
18, 19} of the paper's description.
"""

from __future__ import annotations

CIFAR_FS: dict[str, tuple[str, ...]] = {
    "train": (
        "dolphin", "seal", "aquarium_fish", "ray", "trout", "orchid", "sunflower", "tulip", "bottle", "bowl", "can",
        "cup", "plate", "apple", "mushroom", "orange", "pear", "clock", "keyboard", "chair", "couch", "bee",
        "caterpillar", "cockroach", "bear", "lion", "tiger", "wolf", "bridge", "castle", "house", "road",
        "skyscraper", "cloud", "forest", "mountain", "elephant", "kangaroo", "porcupine", "possum", "raccoon",
        "skunk", "lobster", "spider", "boy", "girl", "dinosaur", "lizard", "snake", "turtle", "hamster", "mouse",
        "rabbit", "shrew", "squirrel", "oak_tree", "palm_tree", "pine_tree", "willow_tree", "bus", "train",
        "lawn_mower", "streetcar", "tank",
    ),
    "val": (
        "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
        "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
    ),
    "test": (
        "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
        "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket",
    ),
}
"""Fine class names of each split."""

FC100: dict[str, tuple[str, ...]] = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
        "household_furniture", "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles",
        "trees", "vehicles_1", "vehicles_2",
    ),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}
"""Superclass (coarse label) names of each split."""
