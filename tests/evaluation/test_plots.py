"""The evaluation plots are ones a person can read: class names on the axes and in legends,
bounded sizes, markers and baselines on the eval curves, no empty training panels."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from mmssl_jax.evaluation import context, plots
from tests.evaluation.test_evaluators import (
    CLASSNAMES,
    FakeEncoder,
    assert_png,
    read_idx,
    write_shard,
)

# 99 classes in 9 groups, as the emoji subgroups (one name longer than a label may be)
GROUPS = [f"group {g}" for g in range(9)]
GROUP_OF = [c // 11 for c in range(99)]
MANY = [f"subgroup {c}" for c in range(98)] + ["a subgroup with a very long name indeed"]


def png_size(path: str) -> tuple[int, int]:
    assert_png(path)
    with Image.open(path) as im:
        return im.size


def legend_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts]


def test_confusion_matrix_of_99_classes_shows_the_most_confused_by_name(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 99, 800)
    labels[:60] = 98
    preds = np.where(rng.random(800) < 0.3, labels, rng.integers(0, 99, 800))
    preds[labels == 98] = 3  # the long-named class is always taken for class 3
    cm = np.zeros((99, 99), np.int64)
    np.add.at(cm, (labels, preds), 1)
    fig = plots.confusion_figure(cm, MANY, title="zs: zero-shot confusion")
    ax = fig.axes[0]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    cols = [t.get_text() for t in ax.get_xticklabels()]
    assert len(rows) == 30 and cols[:30] == rows and cols[30] == "other 69 classes"
    assert "a subgroup with a v…" in rows and "subgroup 3" in rows  # the most confused
    assert all(len(r) <= 20 for r in rows)
    assert "row-normalised" in ax.get_title() and "30 of 99 classes" in ax.get_title()
    image = ax.get_images()[0].get_array()
    shown = plots.confused_classes(cm, 30)
    np.testing.assert_allclose(image.sum(axis=1), 1.0)  # the "other" column completes rows
    np.testing.assert_allclose(image[:, :30], (cm / cm.sum(1, keepdims=True))[np.ix_(shown, shown)])
    width, height = png_size(plots.save_figure(fig, str(tmp_path / "cm.png")))
    assert 600 <= width <= plots.MAX_SIDE_PX and 600 <= height <= plots.MAX_SIDE_PX


def test_confusion_matrix_of_10_classes_names_every_class_and_counts(tmp_path):
    cm = np.diag(np.arange(1, 11)) + 1
    path = plots.plot_confusion_matrix(cm, CLASSNAMES, str(tmp_path / "cm.png"), title="fm")
    fig = plots.confusion_figure(cm, CLASSNAMES, title="fm")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSNAMES
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSNAMES
    assert "image counts" in ax.get_title()
    assert len(ax.texts) == 100  # every cell holds a count
    width, height = png_size(path)
    assert width <= 1000 and height <= 1000


def test_tsne_legend_names_classes_groups_or_the_most_frequent(tmp_path):
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(600, 2))
    # ten Fashion-MNIST classes: one colour and one name each
    fig = plots.embedding_figure(xy[:200], np.arange(200) % 10, CLASSNAMES)
    assert [t.split(" (")[0] for t in legend_texts(fig)] == CLASSNAMES
    # 99 classes with groups: coloured by group, the legend names the groups
    labels = rng.integers(0, 99, 600)
    fig = plots.embedding_figure(xy, labels, MANY, groups=(GROUPS, GROUP_OF))
    assert [t.split(" (")[0] for t in legend_texts(fig)] == GROUPS
    assert "group" in fig.axes[0].get_legend().get_title().get_text()
    # 99 classes, no groups: the 10 most frequent by name, the rest grey as "other"
    labels = np.concatenate([np.arange(99).repeat(5), np.full(105, 42)])
    fig = plots.embedding_figure(xy, labels, MANY)
    texts = legend_texts(fig)
    assert len(texts) == 11 and texts[0].startswith("other 89 classes")
    assert "subgroup 42 (" in " ".join(texts)
    grey = fig.axes[0].collections[0].get_facecolor()[0][:3]  # "other": drawn first, grey
    np.testing.assert_allclose(grey, [0xC8 / 255] * 3)
    path = plots.save_figure(fig, str(tmp_path / "tsne.png"))
    width, height = png_size(path)
    assert width <= 1200 and height <= 900


def test_plot_labels_come_from_beside_the_shards(tmp_path):
    images, labels = read_idx("train", 120)
    write_shard(str(tmp_path / "fm-test-00000-of-00001.tfrecord"), images, labels)
    (tmp_path / "fm-classnames.json").write_text(json.dumps(CLASSNAMES))
    cfg = {"test_shards": f"{tmp_path}/fm-test-*.tfrecord", "classnames": None, "groups": None}
    names, groups = context.plot_labels(cfg)
    assert names == CLASSNAMES and groups is None
    (tmp_path / "fm-groups.json").write_text(
        json.dumps({"groups": ["tops", "rest"], "group_of_label": [0, 1] * 5})
    )
    assert context.plot_labels(cfg)[1] == (["tops", "rest"], [0, 1] * 5)
    # a real t-SNE of Fashion-MNIST features, legend from the shards' class names
    feats = FakeEncoder(None).image_features(np.repeat(images[..., None], 3, -1))["emb"]
    path = plots.plot_embedding_map(feats, labels, names, str(tmp_path / "t.png"), seed=0)
    width, height = png_size(path)
    assert 600 <= width <= 1200 and 500 <= height <= 900


def test_eval_curves_after_one_evaluation_show_points_and_baselines(tmp_path):
    metrics = {f"ret/img2txt_R@{k}": 0.1 * k for k in (1, 5, 10)}
    metrics |= {"ret/img2txt_mAP": 0.2, "zs/top1": 0.3, "zs/top5": 0.5, "probe/emb/top1": 0.7}
    history = [{"step": 100, **metrics}]
    base = {
        "random init": {k: v / 2 for k, v in metrics.items()},
        "raw pixels": {"probe/emb/top1": 0.8},
    }
    panels = plots.eval_panels(list(metrics))
    assert list(panels) == ["ret: image→text R@K", "ret: mAP", "zs", "probe"]
    assert panels["ret: image→text R@K"] == {f"R@{k}": f"ret/img2txt_R@{k}" for k in (1, 5, 10)}
    fig = plots.curves_figure(history, panels=panels, baselines=base, cols=3)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == list(panels)
    first = axes[0]
    trained = [ln for ln in first.lines if ln.get_marker() == "o"]
    assert len(trained) == 3 and {tuple(ln.get_xdata()) for ln in trained} == {(100,)}
    assert len({ln.get_color() for ln in trained}) == 3  # distinct colours
    dashed = [ln for ln in first.lines if ln.get_linestyle() == "--"]
    assert sorted(ln.get_ydata()[0] for ln in dashed) == [0.05, 0.25, 0.5]
    probe = axes[3]
    assert {ln.get_linestyle() for ln in probe.lines} == {"-", "--", ":"}
    names = [t.get_text() for legend in fig.legends for t in legend.texts]
    assert names == ["trained (points over steps)", "random init", "raw pixels"]
    path = plots.save_figure(fig, str(tmp_path / "eval_curves.png"))
    width, height = png_size(path)
    assert width <= plots.MAX_SIDE_PX and height <= 1000


def test_train_curves_drop_panels_that_are_always_zero_or_copies(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [
        {
            "step": s,
            "bad_streak": 0.0,
            "clip/i2t_acc": 0.1 * s,
            "clip/loss": 3.0 - 0.1 * s,
            "clip/t2i_acc": 0.12 * s,
            "data/skipped_records": 0.0,
            "loss": 3.0 - 0.1 * s,  # one objective: the total is clip/loss
            "skipped_steps": 0.0,
            "step_time": 0.5,
            "data_time": 0.1,
            "lr": 1e-3,
        }
        for s in range(10, 110, 10)
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plots.curves_figure(str(log), prune=True, title="training")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["loss", "clip/acc", "seconds per step", "lr"]
    assert legend_texts(fig) == ["image→text", "text→image", "step", "waiting for data"]
    note = fig.get_suptitle()
    assert "always 0, not shown: bad_streak, data/skipped_records, skipped_steps" in note
    assert "clip/loss = loss" in note
    path = plots.plot_curves(str(log), str(tmp_path / "train.png"), prune=True)
    width, height = png_size(path)
    assert width <= plots.MAX_SIDE_PX and height <= 600
