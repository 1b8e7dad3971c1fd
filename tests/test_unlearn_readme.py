"""The unlearning README: its add-a-method example runs, its grid table matches the presets."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np

from ascent_jax import klom, models, train, unlearn
from ascent_jax.unlearn import base, catalog, grids

README = Path(unlearn.__file__).with_name("README.md").read_text()


def _example() -> str:
    section = README.split("## Add your own method", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_add_a_method_example_runs(fashion_small, fashion_norm, monkeypatch):
    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))  # the example's registration stays local
    images, labels = fashion_small[0][:256], fashion_small[1][:256]
    model = models.build("mlp", 10, hidden=(32,))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), (28, 28, 1)))  # traced, not compiled
    rng = np.random.default_rng(0)
    pretrained = jax.tree_util.tree_map(lambda s: 0.05 * rng.standard_normal((2, *s.shape)).astype(s.dtype), shapes)
    forget = np.arange(10)
    namespace = {"model": model, "pretrained": pretrained, "images": images, "labels": labels,
                 "norm": fashion_norm, "forget": forget}
    exec(compile(_example(), "README.md", "exec"), namespace)
    result = namespace["result"]
    assert "random_labels" in unlearn.names()
    assert result.margins[2].shape == (2, 256) and not result.diverged.any()
    before = klom.margins(train.predict(model, pretrained, images[forget], fashion_norm), labels[forget])
    assert np.abs(result.margins[2][:, forget] - before).max() > 1e-3
    assert result.metrics["forget_loss"].shape == (2, 2)


def test_readme_tables_are_generated_from_the_registry():
    assert catalog.render(README) == README, "run python -m ascent_jax.unlearn.catalog"
    for name in unlearn.names():
        assert f"| `{name}` | `{unlearn.get(name).config.__name__}(" in README
    for preset, methods in grids.presets().items():
        for method in methods:
            configs = grids.expand(method, preset)
            row = re.search(rf"^\| {preset} \| {method} \|.*\| (\d+) \| (\d+) \|$", README, re.M)
            assert row, f"README has no grid row for {preset}/{method}"
            assert (int(row.group(1)), int(row.group(2))) == (len(configs), len(grids.group_runs(configs)))


def test_a_new_method_appears_in_the_generated_tables(monkeypatch):
    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))
    namespace = {}
    exec(compile(_example().split("unlearn.register(")[0], "README.md", "exec"), namespace)
    unlearn.register("random_labels", namespace["RandomLabelConfig"], namespace["random_label_epoch"],
                     grids={"quick": {"lr": (1e-2,), "epochs": (1, 2)}})
    assert catalog.render(README) != README
    assert ("| `random_labels` | `RandomLabelConfig(lr, epochs, batch_size=64)` | sgd, momentum 0.9 | Fit the forget "
            "set to random wrong labels (10 classes): one model, one epoch, pure. | - | pretrained model |"
            in catalog.method_table())
    assert "| quick | random_labels | lr 0.01 × epochs ∈ {1, 2} | 2 | 1 |" in catalog.grid_table()
    assert catalog.main(["--check"]) == 1
