"""Seed-addressed augmentation: each op against an independent computation, batching never changes a bit,
and augmented episodes are the same bytes in this process, in two Ray workers and on a recomputed share."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.augment import Affine, Augment, Jitter
from tasks.episode import AUGMENT, EpisodeIds, episode_rng
from tasks.fewshot import FewShotTasks
from tasks.store_writer import StoreWriter

FIELDS = ("support_x", "support_y", "query_x", "query_y")
EVERYTHING = Augment(crop_padding=2, flip=True, jitter=Jitter(0.4, 0.4, 0.4), affine=Affine(15, 10, (0.8, 1.2), 0.1))


def images(n: int, c: int, h: int = 9, w: int = 9, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, c, h, w), dtype=np.float32)


def test_crop_flip_and_jitter_match_their_definitions():
    x = images(6, 3)
    d = Augment(crop_padding=3).draw(np.random.default_rng(1), 6)
    out = Augment(crop_padding=3).apply(x, d)
    for i in range(6):
        padded = np.pad(x[i], ((0, 0), (3, 3), (3, 3)))
        r, c = d["offset"][i]
        np.testing.assert_array_equal(out[i], padded[:, r:r + 9, c:c + 9])
    assert len({tuple(o) for o in d["offset"]}) > 1

    d = Augment(flip=True).draw(np.random.default_rng(2), 6)
    out = Augment(flip=True).apply(x, d)
    assert 0 < d["flip"].sum() < 6
    for i in range(6):
        np.testing.assert_array_equal(out[i], x[i, :, :, ::-1] if d["flip"][i] else x[i])

    aug = Augment(jitter=Jitter(0.4, 0.5, 0.6))
    d = aug.draw(np.random.default_rng(3), 6)
    out = aug.apply(x, d)
    for i in range(6):  # torchvision's adjust_brightness/contrast/saturation, in float64
        y = np.clip(x[i].astype(np.float64) * d["brightness"][i], 0, 1)
        gray = 0.299 * y[0] + 0.587 * y[1] + 0.114 * y[2]
        y = np.clip(d["contrast"][i] * y + (1 - d["contrast"][i]) * gray.mean(), 0, 1)
        gray = 0.299 * y[0] + 0.587 * y[1] + 0.114 * y[2]
        y = np.clip(d["saturation"][i] * y + (1 - d["saturation"][i]) * gray, 0, 1)
        np.testing.assert_allclose(out[i], y, atol=2e-6)
    assert 0.6 <= d["brightness"].min() and d["saturation"].max() <= 1.6


def reference_affine(img: np.ndarray, angle: float, shear: float, scale: float, shift: np.ndarray) -> np.ndarray:
    """Per pixel, in float64: invert the 3x3 forward map with numpy, sample bilinearly, zero outside."""
    c, h, w = img.shape
    a, s = math.radians(angle), math.radians(shear)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    shear_x = np.array([[1, math.tan(s), 0], [0, 1, 0], [0, 0, 1]])
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    to_centre, back = np.eye(3), np.eye(3)
    to_centre[:2, 2], back[:2, 2] = -centre, centre + shift * [w, h]
    inverse = np.linalg.inv(back @ rot @ shear_x @ np.diag([scale, scale, 1]) @ to_centre)
    out = np.zeros((c, h, w))
    for y in range(h):
        for x in range(w):
            sx, sy, _ = inverse @ [x, y, 1]
            x0, y0 = math.floor(sx), math.floor(sy)
            fy, fx = sy - y0, sx - x0
            for yy, xx, weight in ((y0, x0, (1 - fy) * (1 - fx)), (y0, x0 + 1, (1 - fy) * fx),
                                   (y0 + 1, x0, fy * (1 - fx)), (y0 + 1, x0 + 1, fy * fx)):
                if 0 <= yy < h and 0 <= xx < w:
                    out[:, y, x] += weight * img[:, yy, xx]
    return out


def test_affine_matches_a_per_pixel_float64_computation_and_a_quarter_turn_is_rot90():
    x = images(5, 2, 11, 8)
    aug = Augment(affine=Affine(degrees=30, shear=20, scale=(0.7, 1.3), translate=0.2))
    d = aug.draw(np.random.default_rng(4), 5)
    out = aug.apply(x, d)
    for i in range(5):
        ref = reference_affine(x[i], d["angle"][i], d["shear"][i], d["scale"][i], d["shift"][i])
        np.testing.assert_allclose(out[i], ref, atol=1e-5)
    assert (out == 0).any() and not np.allclose(out, x, atol=0.05)  # moved, with zeros shifted in
    square = images(2, 1, 7, 7)
    turn = {"angle": np.array([90.0, -90.0]), "shear": np.zeros(2), "scale": np.ones(2), "shift": np.zeros((2, 2))}
    turned = Augment(affine=Affine(degrees=90)).apply(square, turn)
    np.testing.assert_allclose(turned[0], np.rot90(square[0], k=-1, axes=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(turned[1], np.rot90(square[1], k=1, axes=(1, 2)), atol=1e-5)


def test_neutral_settings_change_no_bit():
    x = images(4, 3)
    neutral = Augment(jitter=Jitter(), affine=Affine())
    assert np.array_equal(neutral(x, np.random.default_rng(0)), x)
    assert not Augment() and EVERYTHING
    with pytest.raises(ValueError, match="crop_padding must be >= 0"):
        Augment(crop_padding=-1)


@pytest.mark.parametrize("channels", [1, 3])
def test_batching_never_changes_a_bit(channels):
    x = images(37, channels, 12, 12)
    d = EVERYTHING.draw(np.random.default_rng(5), 37)
    whole = EVERYTHING.apply(x, d)
    one_by_one = np.concatenate([EVERYTHING.apply(x[i:i + 1], {k: v[i:i + 1] for k, v in d.items()})
                                 for i in range(37)])
    assert np.array_equal(whole, one_by_one)
    assert whole.dtype == np.float32 and whole.min() >= 0 and whole.max() <= 1
    assert np.array_equal(x, images(37, channels, 12, 12))  # the input is untouched


@pytest.fixture
def store_path(tmp_path):
    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path / "s.arrow", (3, 10, 10), source="test", preprocessing="random") as w:
        for c in range(8):
            w.add_class(f"c{c}", f"g{c // 4}", rng.integers(0, 256, (6, 3, 10, 10), dtype=np.uint8))
    return tmp_path / "s.arrow"


def test_an_augmented_episode_holds_the_plain_episodes_images_distorted_by_its_own_generator(store_path):
    ids = EpisodeIds(seed=1, step=2, indices=(0, 3))
    plain = FewShotTasks(store_path, 3, 2, 2, classes=range(8)).sample(ids)
    support_only = FewShotTasks(store_path, 3, 2, 2, classes=range(8), augment=EVERYTHING,
                                augment_query=False).sample(ids)
    assert torch.equal(support_only.query_x, plain.query_x) and torch.equal(support_only.support_y, plain.support_y)
    assert not torch.equal(support_only.support_x, plain.support_x)
    # Exactly the plain images put through the episode's augmentation stream, episode by episode.
    for t, index in enumerate(ids.indices):
        rng = episode_rng(ids.seed, ids.step, index, ids.purpose, stream=AUGMENT)
        expected = EVERYTHING(plain.support_x[t].numpy(), rng)
        assert np.array_equal(support_only.support_x[t].numpy(), expected)
    both = FewShotTasks(store_path, 3, 2, 2, classes=range(8), augment=EVERYTHING).sample(ids)
    assert torch.equal(both.support_x, support_only.support_x)  # support is drawn first either way
    assert not torch.equal(both.query_x, plain.query_x)


def test_augmented_episodes_are_the_same_bytes_in_process_in_two_ray_workers_and_recomputed(store_path, ray_local):
    import ray

    kwargs = dict(rotations=True, within_group=True, augment=EVERYTHING)
    local = FewShotTasks(store_path, 3, 1, 2, range(8), **kwargs)
    ids = EpisodeIds(seed=7, step=4, indices=tuple(range(6)))
    whole = local.sample(ids)
    Sampler = ray.remote(num_cpus=1)(FewShotTasks)
    workers = [Sampler.remote(str(store_path), 3, 1, 2, list(range(8)), **kwargs) for _ in range(2)]
    try:
        shares = ids.split(2)
        remote = ray.get([w.sample.remote(s) for w, s in zip(workers, shares)])
        recomputed = ray.get(workers[1].sample.remote(shares[0]))  # worker 0's share, lost and redone by worker 1
        pids = ray.get([w.__ray_call__.remote(lambda self: __import__("os").getpid()) for w in workers])
    finally:
        for w in workers:
            ray.kill(w)
    assert len(set(pids)) == 2
    for f in FIELDS:
        assert torch.equal(torch.cat([getattr(r, f) for r in remote]), getattr(whole, f)), f
        assert torch.equal(getattr(recomputed, f), getattr(remote[0], f)), f
    assert not torch.equal(whole.support_x, FewShotTasks(store_path, 3, 1, 2, range(8), rotations=True,
                                                         within_group=True).sample(ids).support_x)
