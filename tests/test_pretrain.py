"""Pre-training on global labels: seed-addressed minibatches, Ray == in-process, bit-identical resume, the test-time
solvers against independent computations (numpy, scikit-learn), and transfer refused on images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from conftest import flat
from learners.algorithms.pretrain import CENTER
from learners.params import materialize
from orchestrator import train
from orchestrator.build import build_algorithm, build_batches, build_tasks
from orchestrator.config import parse_config
from tasks.episode import EpisodeIds, Purpose
from tasks.store_writer import StoreWriter

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """3 alphabets of 4 characters, 8 drawings each: a character is a fixed random pattern with 10% of its pixels
    flipped per drawing (learnable); train a0, a1 (8 classes, 32 with rotations), test a2."""
    path = tmp_path_factory.mktemp("store") / "s.arrow"
    rng = np.random.default_rng(0)
    with StoreWriter(path, SHAPE, source="test", preprocessing="random") as w:
        for c in range(12):
            pattern = rng.random(SHAPE) > 0.5
            drawings = pattern[None] ^ (rng.random((8, *SHAPE)) < 0.1)
            w.add_class(f"a{c // 4}/c{c % 4}", f"a{c // 4}", (drawings * 255).astype(np.uint8))
    return path


def config(store, tmp_path, **sections):
    data = {
        "run": {"name": "pt", "dir": str(tmp_path / "runs"), "checkpoint_every": 2, "log_every": 1000},
        "task": {"family": "images", "store": str(store), "n_way": 4, "k_shot": 2, "query": 3, "rotations": True,
                 "split": {"by": "group", "train": ["a0", "a1"], "test": ["a2"]}},
        "model": {"backbone": "conv4", "width": 8},
        "algorithm": {"name": "pretrain", "images_per_task": 12, "center_batches": 4},
        # 4 x 12 = 48 images a step from a pool of 256: an epoch every ~5 steps, so runs here cross epochs.
        "outer": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "meta_batch_size": 4,
                  "steps": 6, "schedule": {"kind": "cosine", "total_steps": 6}},
        "workers": {"mode": "inprocess", "num_workers": 2},
        "eval": {"tasks": 10, "steps": [0], "batch_tasks": 5},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return parse_config(data)


def test_minibatches_are_seed_addressed_epochs_of_global_labels(store, tmp_path):
    cfg = config(store, tmp_path, task={"augment": {"affine": {"degrees": 10, "translate": 0.1}}})
    batches = build_batches(cfg)
    assert batches.num_classes == 32 and batches.pool == 8 * 8 * 4
    ids = EpisodeIds(7, 3, (0, 1, 2, 3), Purpose.BATCH)
    share = batches.sample(ids)
    assert share.support_x.shape == (4, 12, *SHAPE) and share.query_x.shape == (4, 0, *SHAPE)
    # The same ids give the same bytes from a fresh source, and a batch alone equals it within a share.
    again = build_batches(cfg).sample(EpisodeIds(7, 3, (2,), Purpose.BATCH))
    assert torch.equal(again.support_x[0], share.support_x[2]) and torch.equal(again.support_y[0], share.support_y[2])
    # Another step, seed or purpose draws other images.
    assert not torch.equal(batches.sample(EpisodeIds(7, 4, (2,), Purpose.BATCH)).support_x[0], share.support_x[2])
    assert not torch.equal(batches.sample(EpisodeIds(8, 3, (2,), Purpose.BATCH)).support_x[0], share.support_x[2])
    # Epochs: the batches of consecutive steps walk through every (image, rotation) once before any repeats.
    plain = build_batches(cfg, augment=False)
    seen = np.concatenate([plain.positions(EpisodeIds(7, s, (), Purpose.BATCH), i)
                           for s in range(plain.pool // 48 + 1) for i in range(4)])
    assert sorted(seen[:plain.pool].tolist()) == list(range(plain.pool))
    # Global labels: label 4c + r is training class c (a0/c0.. a1/c3) rotated r quarter turns, checked by pixels.
    from tasks.store import ImageStore

    raw = ImageStore.open(store)
    x = plain.sample(EpisodeIds(7, 3, (1,), Purpose.BATCH))
    for img, label in zip(x.support_x[0].numpy(), x.support_y[0].tolist()):
        c, r = divmod(label, 4)
        originals = np.rot90(raw.images(c).astype(np.float32) / 255, k=r, axes=(2, 3))
        assert any(np.array_equal(img, o) for o in originals), label


@pytest.mark.usefixtures("ray_local")
def test_pretraining_on_ray_equals_in_process_and_workers_draw_the_same_bytes(store, tmp_path):
    import ray

    local = train(config(store, tmp_path / "local", outer={"steps": 4}), evaluate=False)
    remote_cfg = config(store, tmp_path / "ray", outer={"steps": 4}, workers={"mode": "ray", "num_workers": 2})
    remote = train(remote_cfg, evaluate=False)
    start = flat(build_algorithm(remote_cfg).init_params(0))
    assert not torch.equal(flat(local.params), start)  # it trained
    rel = float((flat(remote.params) - flat(local.params)).norm() / flat(local.params).norm())
    assert rel <= 1e-6, rel
    assert local.history["inner/loss_before"][-1] < local.history["inner/loss_before"][0]  # and learned

    @ray.remote(num_cpus=1)
    def batch_bytes(cfg_dict):
        from orchestrator.build import build_batches
        from orchestrator.config import parse_config

        b = build_batches(parse_config(cfg_dict)).sample(EpisodeIds(0, 5, (1, 3), Purpose.BATCH))
        return b.support_x.numpy().tobytes(), b.support_y.numpy().tobytes()

    here = build_batches(remote_cfg).sample(EpisodeIds(0, 5, (1, 3), Purpose.BATCH))
    there = ray.get(batch_bytes.remote(remote_cfg.model_dump(mode="json")))
    assert there == (here.support_x.numpy().tobytes(), here.support_y.numpy().tobytes())


def test_resume_is_bit_identical_and_evaluates_like_every_algorithm(store, tmp_path):
    sections = {"task": {"augment": {"flip": True, "crop_padding": 2}}}
    straight = train(config(store, tmp_path / "a", **sections))
    config_b = config(store, tmp_path / "b", **sections)
    train(config(store, tmp_path / "b", outer={"steps": 3}, **sections), evaluate=False)
    resumed = train(config_b, resume=True)
    assert torch.equal(flat(straight.params), flat(resumed.params))
    # Scored on the held-out episodes like the others: accuracy after 0 steps, the query set's loss.
    acc = resumed.results["test"]["acc"][0]
    assert acc.n == 10 and 0.0 <= acc.mean <= 1.0
    assert straight.results["test"]["acc"][0].mean == acc.mean


def _episode_and_embeddings(store, tmp_path, solver):
    """A briefly pre-trained θ, one held-out episode, and what the solvers see, computed here with the real
    module (not the algorithm's functional path): centred, normalized support and query embeddings."""
    cfg = config(store, tmp_path / solver, algorithm={"solver": solver}, outer={"steps": 3})
    params = train(cfg, evaluate=False).params
    algorithm = build_algorithm(cfg)
    batch = build_tasks(cfg.task, "eval").sample(EpisodeIds(2024, 0, (0,), Purpose.EVAL))
    net = materialize(algorithm.model.features, {k.removeprefix("features."): v for k, v in params.items()
                                                 if k.startswith("features.")}).double()
    base = build_batches(cfg, augment=False)
    with torch.no_grad():
        mean = torch.cat([net(base.sample(EpisodeIds(0, 0, (i,), Purpose.EVAL)).support_x[0].double())
                          for i in range(4)]).mean(0)

        def seen(x):
            z = net(x.double()) - mean
            return (z / z.norm(dim=1, keepdim=True)).numpy()

        zs, zq = seen(batch.support_x[0]), seen(batch.query_x[0])
        prepared = algorithm.prepare(params)
        task = algorithm.start(prepared, batch.support_x[0], batch.support_y[0])
        logits = algorithm.predict(task, batch.query_x[0]).double()
    assert torch.allclose(prepared[CENTER].double(), mean, atol=1e-5)
    return zs, batch.support_y[0].numpy(), zq, logits, algorithm


def test_nearest_centroid_is_simpleshot_on_centred_normalized_embeddings(store, tmp_path):
    zs, ys, zq, logits, algorithm = _episode_and_embeddings(store, tmp_path, "centroid")
    centroids = np.stack([zs[ys == c].mean(0) for c in range(4)])
    dist2 = ((zq[:, None, :] - centroids[None]) ** 2).sum(-1)
    expected = torch.softmax(torch.from_numpy(-algorithm.logit_scale * dist2), 1)
    assert torch.allclose(torch.softmax(logits, 1), expected, atol=1e-4)
    assert (logits.argmax(1).numpy() == dist2.argmin(1)).all()


def test_logistic_regression_matches_scikit_learn(store, tmp_path):
    from sklearn.linear_model import LogisticRegression

    zs, ys, zq, logits, _ = _episode_and_embeddings(store, tmp_path, "logistic")
    fit = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(zs, ys)
    assert np.abs(torch.softmax(logits, 1).numpy() - fit.predict_proba(zq)).max() < 1e-4


def test_transfer_is_refused_on_images_and_points_at_pretrain(store, tmp_path, capsys):
    from orchestrator.cli.main import main

    path = tmp_path / "transfer.yaml"
    data = config(store, tmp_path).model_dump(mode="json")
    data["algorithm"] = {"name": "transfer"}
    path.write_text(yaml.safe_dump(data))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "algorithm.name: transfer" in err and "algorithm.name: pretrain" in err, err
    assert not (tmp_path / "runs").exists()


def test_ridge_head_on_the_frozen_embedding_is_the_ridge_fit(store, tmp_path):
    zs, ys, zq, logits, algorithm = _episode_and_embeddings(store, tmp_path, "ridge")
    onehot = np.eye(4)[ys]
    alpha = np.linalg.solve(zs @ zs.T + algorithm.ridge_lambda * np.eye(len(zs)), onehot)  # (K + λI)⁻¹ Y
    expected = algorithm.logit_scale * zq @ (zs.T @ alpha)
    assert np.abs(logits.numpy() - expected).max() < 1e-4


def test_metaray_eval_takes_another_solver_but_no_training_key(store, tmp_path, capsys):
    from orchestrator.cli.main import main

    cfg = config(store, tmp_path, outer={"steps": 1}, eval={"tasks": 4})
    train(cfg, evaluate=False)
    assert main(["eval", str(cfg.run_dir), "--set", "algorithm.solver=logistic", "--set", "eval.tasks=4"]) == 0
    assert "pretrain" in capsys.readouterr().out
    assert main(["eval", str(cfg.run_dir), "--set", "algorithm.images_per_task=8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--set algorithm.images_per_task=8" in err and "algorithm.solver" in err, err


def test_the_logged_model_carries_the_mean_training_embedding_and_scores_like_evaluation(store, tmp_path,
                                                                                         mlflow_store):
    """A deployed pre-trained model has no training images: it is logged with the mean training embedding its
    centring needs (a statistic of θ), and MLflow's loaded pyfunc gets the evaluation's accuracy per episode."""
    import mlflow
    from mlflow import MlflowClient

    cfg = config(store, tmp_path, tracking={"enabled": True, "uri": mlflow_store, "experiment": "pretrain-model",
                                            "log_model": True, "system_metrics": False, "plots": False,
                                            "log_checkpoint": False, "flush_every_s": 0.2})
    trained = train(cfg)
    client = MlflowClient(mlflow_store)
    (logged,) = client.search_logged_models([client.get_experiment_by_name("pretrain-model").experiment_id])
    model = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    batch = build_tasks(cfg.task, "eval").sample(EpisodeIds(cfg.eval.seed, 0, tuple(range(10)), Purpose.EVAL))
    acc = np.mean([np.mean(model.predict({"support_x": batch.support_x[i].numpy(),
                                          "support_y": batch.support_y[i].numpy(),
                                          "query_x": batch.query_x[i].numpy()}) == batch.query_y[i].numpy())
                   for i in range(10)])
    assert acc == pytest.approx(trained.results["test"]["acc"][0].mean, abs=1e-6)
