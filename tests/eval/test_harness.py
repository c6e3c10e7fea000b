"""The evaluation harness: data helpers, and `fwserve eval` end to end on a tiny subset against
an in-process server (real HTTP)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from eval import data as D
from eval.harness import window_accuracy

pytest.importorskip("imagecorruptions")


def test_stream_orders():
    labels = np.repeat(np.arange(4), 30)
    iid = D.stream_order(labels, "iid", 0)
    assert sorted(iid.tolist()) == list(range(120))
    corr = D.stream_order(labels, "correlated", 0, run_length=10)
    assert sorted(corr.tolist()) == list(range(120))
    runs = np.split(labels[corr], 12)
    assert all(len(set(r.tolist())) == 1 for r in runs)  # runs of one class
    inc = labels[D.stream_order(labels, "incremental", 0)]
    assert (np.diff(inc) != 0).sum() == 3  # class by class
    assert not np.array_equal(D.stream_order(labels, "iid", 1), iid)


def test_corrupted_digits_are_28x28_gray_and_reproducible(tmp_path):
    data = D.mnist("held_out", (0, 1)).take(slice(0, 3))
    for name in ("glass_blur", "fog", "gaussian_noise"):  # the two patched for numpy 2 / skimage, one plain
        a = D.corrupted(data, name, 5, seed=0, cache_dir=tmp_path)
        b = D.corrupted(data, name, 5, seed=0)
        assert a.images.shape == (3, 28, 28) and a.images.dtype == np.uint8
        assert np.array_equal(a.images, b.images)
        assert not np.array_equal(a.images, data.images)
    assert len(list(tmp_path.iterdir())) == 3


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


def test_window_accuracy():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    correct = np.array([0, 0, 0, 0, 1, 1, 0, 1], dtype=bool)
    assert window_accuracy(correct, labels, 2, 2) == 1.0  # rows 4, 5: after two of each class
    assert window_accuracy(correct, labels, 5, 2) is None


def test_eval_end_to_end_in_process(tmp_path):
    """`fwserve eval` on a tiny subset: every benchmark, both orders, static and three rules,
    plus a user ImageFolder; writes the Markdown report, JSON and plots."""
    from server.cli import main

    folder = tmp_path / "data"
    held = D.mnist("held_out", (7, 8, 9))
    for c in (7, 8, 9):
        (folder / f"digit{c}").mkdir(parents=True)
        for i, img in enumerate(held.images[held.labels == [7, 8, 9].index(c)][:6]):
            Image.fromarray(img).save(folder / f"digit{c}" / f"{i}.png")
    out = tmp_path / "report"
    rc = main(["eval", "--random-init", "--out", str(out), "--subset", "6", "--episodes", "2", "--stream-seeds", "1",
               "--corruption", "contrast", "--severities", "5", "--rules", "prototype,t3a,tent", "--workers", "2",
               "--batch", "5", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--benchmarks",
               "shift,novel,domain", "--data", str(folder)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    md = (out / "README.md").read_text()
    assert "fwserve eval --random-init" in md and "| severity |" in md and "## Targets" in md
    for key in ("shift", "domain", "novel_streams", "data"):
        rows = results[key]
        assert {r["method"] for r in rows} == {"static", "prototype", "t3a", "tent"}, key
        assert {r["order"] for r in rows} == ({"iid", "incremental"} if key in ("novel_streams", "data")
                                              else {"iid", "correlated"})
        for r in rows:
            assert 0.0 <= r["prequential"] <= 1.0 and 0.0 <= r["final"] <= 1.0 and r["curve"]
    lf = [r for r in results["shift"] if r["method"] in ("t3a", "tent")]
    assert lf and not any(r["labelled"] for r in lf)  # label-free rules never saw a label on the shift
    assert {(e["shots"], e["method"]) for e in results["novel_episodes"]} >= {(1, "static"), (5, "t3a")}
    assert results["novel_probe"] is not None and results["domain_probe"] is not None
    assert set(results["latency"]) >= {"prototype", "t3a", "tent"}
    assert all(v["updates"] > 0 and v["mean_s"] > 0 for v in results["latency"].values())
    for png in ("shift_curves.png", "novel_curves.png", "domain_curves.png", "data_curves.png"):
        assert (out / png).stat().st_size > 1000
