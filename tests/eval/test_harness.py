"""The evaluation: data and splits, stream orders, baselines, the bootstrap and the target rule,
the simulation against a real server over HTTP, validation's grid search, and `fwserve eval`
end to end on a tiny subset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval import baselines as B
from eval import data as D
from eval import stats

pytest.importorskip("imagecorruptions")


def test_splits_are_disjoint_and_the_held_out_split_is_the_old_one():
    from models.data import load_mnist, split_indices

    _, labels = load_mnist()
    idx = split_indices(labels)
    sets = {k: set(v.tolist()) for k, v in idx.items()}
    assert sum(len(s) for s in sets.values()) == len(labels) == len(set.union(*sets.values()))
    assert {k: len(v) for k, v in sets.items()} == {"train": 3000, "selection": 1000, "held_out": 1000}
    rng = np.random.default_rng(0)  # the held-out split of the original two-way split: first 100 per class
    old = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:100] for c in range(10)]))
    assert np.array_equal(idx["held_out"], old)
    a, b = D.sklearn_digits(part="selection"), D.sklearn_digits(part="test")
    assert len(a) + len(b) == len(D.sklearn_digits()) and abs(len(a) - len(b)) < 10
    assert not set(map(bytes, a.images)) & set(map(bytes, b.images))


def test_stream_orders():
    labels = np.repeat(np.arange(4), 30)
    iid = D.stream_order(labels, "iid", 0)
    assert sorted(iid.tolist()) == list(range(120))
    corr = D.stream_order(labels, "correlated", 0, run_length=10)
    assert sorted(corr.tolist()) == list(range(120))
    assert all(len(set(r.tolist())) == 1 for r in np.split(labels[corr], 12))  # runs of one class
    inc = labels[D.stream_order(labels, "incremental", 0)]
    assert (np.diff(inc) != 0).sum() == 3  # class by class
    diri = D.stream_order(labels, "dirichlet", 0)
    assert sorted(diri.tolist()) == list(range(120))
    # label shift: the class mix of 10-row slots is far from uniform, unlike an i.i.d. order
    spread = lambda o: np.mean([np.bincount(labels[o][i:i + 10], minlength=4).max() for i in range(0, 120, 10)])  # noqa
    assert spread(diri) > spread(iid) + 2
    assert not np.array_equal(D.stream_order(labels, "dirichlet", 1), diri)


def test_corrupted_and_shifted_digits_are_28x28_gray_and_reproducible(tmp_path):
    data = D.mnist("held_out", (0, 1)).take(slice(0, 3))
    for name in ("glass_blur", "fog", "gaussian_noise"):  # the two patched for numpy 2 / skimage, one plain
        a = D.corrupted(data, name, 5, seed=0, cache_dir=tmp_path)
        b = D.corrupted(data, name, 5, seed=0)
        assert a.images.shape == (3, 28, 28) and a.images.dtype == np.uint8
        assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, data.images)
    assert len(list(tmp_path.iterdir())) == 3
    for name in D.SHIFTS:
        a, b = D.shifted(data, name), D.shifted(data, name)
        assert a.images.shape == (3, 28, 28) and a.images.dtype == np.uint8, name
        assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, data.images), name
    assert np.array_equal(D.shifted(data, "inversion").images, 255 - data.images)
    assert (D.shifted(data, "thicken").images >= data.images).all() and (D.shifted(data, "thin").images <= data.images).all()


def test_sklearn_digits_and_image_folder(tmp_path):
    d = D.sklearn_digits()
    assert d.images.shape[1:] == (28, 28) and d.images[:, :4].max() == 0 and d.images.max() > 200
    assert set(d.labels.tolist()) == {0, 1, 2, 3, 4}
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(np.full((40, 30, 3), 50 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    f = D.image_folder(tmp_path)
    assert f.classes == ["cat", "dog"] and f.images.shape == (4, 28, 28) and f.labels.tolist() == [0, 0, 1, 1]


def test_baselines():
    labels = np.repeat([0, 1, 2], 20)  # class by class: repeating the previous label is right inside runs
    assert B.repeat_previous(labels, 10) == pytest.approx(30 / 60)  # the 3 requests opening a class, and the first
    assert B.repeat_previous(np.zeros(25, dtype=int), 10) == pytest.approx(15 / 25)
    g = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    imgs = (g.random((80, 28, 28)) * 60).astype(np.uint8)
    imgs[y == 1, 10:18, 10:18] = 255
    assert B.pixels_ncm(imgs[::2], y[::2], imgs[1::2], y[1::2]) == 1.0
    acc, c = B.reference(imgs[::2].reshape(40, -1).astype(float), y[::2], imgs[1::2].reshape(40, -1).astype(float),
                         y[1::2])
    assert acc == 1.0 and c in B.REFERENCE_CS


def test_bootstrap_intervals_and_the_target_rule():
    g = np.random.default_rng(1)
    a = 0.3 + 0.05 * g.standard_normal((6, 10))
    b = a / 0.6  # exactly 0.6 x everywhere: the interval is that point
    est, lo, hi = stats.paired_bootstrap(a, b, stats.ratio_of_means)
    assert est == pytest.approx(0.6) and lo == pytest.approx(0.6) and hi == pytest.approx(0.6)
    noisy = b * (1 + 0.3 * g.standard_normal(b.shape))
    est, lo, hi = stats.paired_bootstrap(a, noisy, stats.ratio_of_means)
    assert lo < est < hi and hi - lo > 0.02
    from eval.report import _target

    assert _target("label_free", a, b, stats.ratio_of_means, 0.75, "ratio", "")["met"]
    straddling = _target("label_free", a, noisy * 0.6 / 0.75 / 0.6 * 0.75, stats.ratio_of_means, est * 0.999, "ratio", "")
    assert straddling["low"] < straddling["threshold"] < straddling["high"] and not straddling["met"]


def test_validation_extends_a_grid_whose_best_value_sits_on_its_edge():
    from eval.validate import Search

    calls = []

    def score(ms):  # best near lambda = 3000, beyond the grid's 1000
        calls.append(len(ms))
        return [-abs(np.log10(m["lambda"]) - np.log10(3000)) for m in ms]

    s = Search("base", "rls", {"lambda": (1.0, 10.0, 100.0, 1000.0)}, lambda s: s, score, {})
    best = s.search()
    assert best["lambda"] == 1e4 or best["lambda"] == 1000.0
    assert s.extended and 1e4 in s.space["lambda"]
    s2 = Search("base", "rls", {"lambda": (1.0, 10.0, 100.0, 1000.0)}, lambda s: s,
                lambda ms: [-abs(np.log10(m["lambda"]) - 1) for m in ms], {})
    assert s2.search() == {"lambda": 10.0} and not s2.extended
    # an axis that starts at 0 (rls.prior): best at 0 is not extended; at the top, a step within the range
    s3 = Search("novel", "rls", {"prior": (0.0, 0.9, 0.99)}, lambda s: s, lambda ms: [-m["prior"] for m in ms], {})
    assert s3.search() == {"prior": 0.0} and not s3.extended
    s4 = Search("novel", "rls", {"prior": (0.0, 0.5)}, lambda s: s, lambda ms: [m["prior"] for m in ms], {})
    assert s4.search() == {"prior": 0.5} and not s4.extended


@pytest.fixture(scope="module")
def bundled_bank(tmp_path_factory):
    from eval.features import FeatureBank
    from models import bundled_weights

    if bundled_weights("fwserve-mnist-vit") is None:
        pytest.skip("the bundled weights are not in this checkout")
    return FeatureBank(cache_dir=tmp_path_factory.mktemp("features"))


def test_simulation_predicts_what_the_server_predicts(bundled_bank):
    """The same streams, stream by stream, through the local simulation and through a real server
    over HTTP: identical prequential predictions, checkpoints and final accuracies."""
    from eval.benchmarks import Plan, base_streams, novel_streams
    from eval.cli import in_process_server
    from eval.served import http_runner
    from eval.simulate import Base, method, run_streams

    plan = Plan(split="selection", benchmarks=("shift",), corruptions=("contrast",), severities=(5,), seeds=1,
                base_orders=("iid", "dirichlet"), subset=12, workers=1)
    streams, _ = base_streams(plan, bundled_bank)
    streams = [s for s in streams if s.key["shift"] == "contrast"]
    nstreams, _ = novel_streams(Plan(split="selection", benchmarks=("novel",), seeds=1, subset=12,
                                     novel_orders=("iid",)), bundled_bank)
    base = Base(bundled_bank.W0, bundled_bank.b0, bundled_bank.source_stats, bundled_bank.learned)
    cases = [(method("static", None, init="base"), streams),
             (method("rls", "rls", {"lambda": 10.0}), streams),
             (method("fs", "feature_stats", {"prior_count": 4.0}, init="base", labelled=False), streams),
             (method("fst3a", "feature_stats_t3a", {"prior_count": 0.0}, init="base", labelled=False), streams[:1]),
             (method("lame", "lame", {"affinity": 8.0, "memory": 10.0}, init="base", labelled=False), streams[:1]),
             (method("ft@5", "sgd", {"lr": 0.1}, init="base", budget=5, fit_epochs=3), streams[:1]),
             (method("proto@3", "prototype", {}, budget=3), nstreams),
             (method("hyper", "hyper", {}), nstreams), (method("meta_sgd", "meta_sgd", {}), nstreams)]
    with in_process_server(bundled_bank.bb) as url:
        served = http_runner(url)
        for m, ss in cases:
            for s in ss:
                local = run_streams(m, [s], base, batch=5)[0]
                remote = served(m, [s], base, 5)[0]
                assert np.array_equal(local["correct"], remote["correct"]), (m.name, s.key)
                assert local["final"] == remote["final"] and local["checkpoints"] == remote["checkpoints"], m.name


def test_learned_rules_join_the_new_class_benchmarks_with_their_targets(bundled_bank):
    """With the bundled backbone (which ships their parameters) the learned rules run on the novel
    streams and episodes, never on the base-class benchmarks, and the report states their targets."""
    from eval import report
    from eval.benchmarks import Plan
    from eval.evaluate import evaluate
    from eval.protocol import DEFAULT_SETTINGS
    from server.rules import RULES

    plan = Plan(split="selection", benchmarks=("novel", "episodes"), seeds=2, subset=12, episodes=6, workers=1)
    results = evaluate(plan, bundled_bank, DEFAULT_SETTINGS, tuple(RULES), baseline_seeds=1, pixels=False,
                       progress=False)
    methods = {r["method"] for r in results["streams"]}
    assert {"hyper", "meta_sgd"} <= methods and not methods & {"t3a", "tent", "feature_stats"}
    assert {"hyper", "meta_sgd"} <= {e["method"] for e in results["episodes"]}
    results["learned_rules"] = {"meta_sgd": {"selection_score": 40.0}, "hyper": {"selection_score": 50.0}}
    targets = {t["id"]: t for t in report.learned_targets(results)}
    assert set(targets) == {"learned_5shot", "learned_1shot", "learned_stream"}
    for t in targets.values():
        assert "`hyper`" in t["value"] and t["low"] <= t["estimate"] <= t["high"]
        assert t["met"] == (t["low"] > t["threshold"])
    results["learned_rules"] = {"meta_sgd": {"selection_score": 60.0}, "hyper": {"selection_score": 50.0}}
    assert report.better_learned_rule(results) == "meta_sgd"


def test_eval_end_to_end(tmp_path):
    """`fwserve eval` on a tiny subset: every benchmark and order, static, the static-after-k
    baselines and some rules, a user ImageFolder; writes the report, JSON and plots; label-free
    rules never get labels and never run on new classes."""
    from server.cli import main

    folder = tmp_path / "data"
    held = D.mnist("held_out", (7, 8, 9))
    for c in (7, 8, 9):
        (folder / f"digit{c}").mkdir(parents=True)
        for i, img in enumerate(held.images[held.labels == [7, 8, 9].index(c)][:8]):
            Image.fromarray(img).save(folder / f"digit{c}" / f"{i}.png")
    out = tmp_path / "report"
    rc = main(["eval", "--random-init", "--out", str(out), "--subset", "8", "--episodes", "2", "--seeds", "2",
               "--low-severity-seeds", "1", "--baseline-seeds", "1", "--corruption", "contrast", "--severities", "3,5",
               "--shifts", "inversion", "--rules", "rls,t3a,feature_stats", "--workers", "1", "--batch", "5",
               "--cache-dir", str(tmp_path / "cache"), "--quiet", "--preregistration", "none",
               "--benchmarks", "shift,shifts,domain,novel,episodes", "--data", str(folder)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    md = (out / "README.md").read_text()
    assert "fwserve eval --random-init" in md and "## Targets" in md and "## Headline" in md
    assert "No pre-registration" in md
    rows = results["streams"]
    by = lambda bench: [r for r in rows if r["benchmark"] == bench]  # noqa: E731
    assert {r["method"] for r in by("shift")} == {"static", "finetune@5", "prototype@5", "rls", "t3a", "feature_stats"}
    assert {r["order"] for r in by("shift") if r["severity"] == 5} == {"iid", "dirichlet", "correlated"}
    assert {r["order"] for r in by("shift") if r["severity"] == 3} == {"iid"}
    assert {r["seed"] for r in by("shifts")} == {0, 1}
    for bench in ("novel", "data"):
        assert {r["method"] for r in by(bench)} == {"prototype@5", "rls"}, bench
        assert {r["order"] for r in by(bench)} == {"iid", "incremental"}
    for r in rows:
        assert 0.0 <= r["prequential"] <= 1.0 and 0.0 <= r["final"] <= 1.0
    assert {t["id"] for t in results["targets"]} >= {"label_free", "dirichlet", "supervised"}
    # a random backbone has no learned rules' parameters: they are left out, and so are their targets
    assert not any(t["id"].startswith("learned") for t in results["targets"])
    assert all(t["low"] <= t["estimate"] <= t["high"] for t in results["targets"] if np.isfinite(t["estimate"]))
    assert any(r["order"] == "dirichlet" for r in results["repeat_previous"])
    assert {b["benchmark"] for b in results["baselines"]} >= {"shift", "shifts", "domain", "novel", "data"}
    assert {e["method"] for e in results["episodes"]} == {"rls"}
    for png in ("shift_curves.png", "novel_curves.png", "domain_curves.png"):
        assert (out / png).stat().st_size > 1000


def test_feature_bank_caches_on_disk(tmp_path):
    from eval.features import FeatureBank

    bank = FeatureBank(random_init=True, cache_dir=tmp_path)  # computes its source statistics (cached too)
    before = len(list(tmp_path.glob("features-*.npy")))
    images = D.mnist("selection", (0,)).images[:5]
    a = bank(images)
    assert a.shape == (5, bank.bb.embed_dim) and len(list(tmp_path.glob("features-*.npy"))) == before + 1
    again = FeatureBank(random_init=True, cache_dir=tmp_path)
    assert np.array_equal(again(images), a)
    x = torch.stack([bank.bb.preprocess(i) for i in images])
    assert np.allclose(bank.bb.features(x).numpy(), a)
    assert set(bank.source_stats) == {"mean", "var", "within_cov"}  # from the training split, with its labels
