import numpy as np
import pytest
import torch

from tasks.episode import EpisodeBatch, EpisodeIds, Purpose, episode_rng
from tasks.sine import SineTasks


def test_episode_depends_only_on_its_id():
    src = SineTasks(k_shot=4, query=3)
    whole = src.sample(EpisodeIds(7, 3, tuple(range(10))))
    # The same episode built alone, or inside another share, is bit-identical.
    alone = src.sample(EpisodeIds(7, 3, (6,)))
    share = src.sample(EpisodeIds(7, 3, (5, 6, 7)))
    for a, b in [(whole.task(6), alone), (whole.task(6), share.task(1))]:
        for t1, t2 in zip((a.support_x, a.support_y, a.query_x, a.query_y), (b.support_x, b.support_y, b.query_x, b.query_y)):
            assert torch.equal(t1, t2)


def test_streams_differ_by_seed_step_index_and_purpose():
    draws = {
        key: episode_rng(*key[:3], key[3]).random()
        for key in [(0, 0, 0, Purpose.TRAIN), (1, 0, 0, Purpose.TRAIN), (0, 1, 0, Purpose.TRAIN),
                    (0, 0, 1, Purpose.TRAIN), (0, 0, 0, Purpose.EVAL)]
    }
    assert len(set(draws.values())) == len(draws)


def test_negative_ids_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        episode_rng(0, -1, 0)


def test_split_covers_every_id_once_in_order():
    ids = EpisodeIds(0, 2, tuple(range(25)))
    shares = ids.split(4)
    assert [len(s) for s in shares] == [7, 6, 6, 6]
    assert sum((s.indices for s in shares), ()) == ids.indices
    assert all(s.step == 2 and s.seed == 0 for s in shares)
    assert len(EpisodeIds(0, 0, (1, 2)).split(5)) == 2  # no empty shares


def test_sine_ranges_and_shapes():
    src = SineTasks(k_shot=10, query=20)
    ids = EpisodeIds(0, 0, tuple(range(200)))
    b = src.sample(ids)
    assert b.support_x.shape == (200, 10, 1) and b.query_y.shape == (200, 20, 1)
    assert b.support_x.dtype == torch.float32
    assert float(b.support_x.min()) >= -5 and float(b.support_x.max()) <= 5
    amp_phase = src.task_parameters(ids)
    assert amp_phase[:, 0].min() >= 0.1 and amp_phase[:, 0].max() <= 5.0
    assert amp_phase[:, 1].min() >= 0 and amp_phase[:, 1].max() <= np.pi
    # y really is A sin(x - phase) of the task's own parameters.
    expected = SineTasks.curve(amp_phase[3], b.query_x[3, :, 0].double().numpy())
    np.testing.assert_allclose(b.query_y[3, :, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_robustness_probe_draws_support_from_its_own_range():
    src = SineTasks(support_x_range=(0.0, 5.0))
    b = src.sample(EpisodeIds(0, 0, tuple(range(100))))
    assert float(b.support_x.min()) >= 0.0
    assert float(b.query_x.min()) < -1.0  # queries still cover the whole period


def test_batch_rejects_mismatched_task_axes():
    with pytest.raises(ValueError, match="number of tasks"):
        EpisodeBatch(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(3, 1), torch.zeros(3, 1))
