"""The default recipe on real data (letters drawn in real fonts), the optimizer's step count and few-shot folders.

The learning test builds, in under a minute, what `benchmarks/transfer.py` measures at scale: a small ReLU CNN
without normalisation pretrained on the letters K-T (a user's own backbone), then the task A-J with 5 labelled
images a class whose test letters come from fonts never seen in training. tlkit's defaults must not lose to the
frozen linear probe that the keras.io guide writes (Dropout, Dense, Adam 1e-3, 30 epochs, best validation epoch).
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os

import keras
import numpy as np
import pytest

import tlkit
from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig, TrainConfig

SIZE = 32


def _fonts() -> list[str]:
    import matplotlib

    root = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    names = ["DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSerif",
             "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic", "DejaVuSansMono",
             "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique", "STIXGeneral",
             "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta", "cmr10", "cmss10", "cmtt10", "cmb10"]
    found = [os.path.join(root, n + ".ttf") for n in names if os.path.exists(os.path.join(root, n + ".ttf"))]
    assert len(found) >= 12, f"matplotlib ships fewer fonts than expected: {glob.glob(root + '/*.ttf')}"
    return found


def _glyph(font: str, letter: str, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("L", (SIZE * 2, SIZE * 2), 0)
    f = ImageFont.truetype(font, int(rng.integers(30, 42)))
    ImageDraw.Draw(img).text((SIZE + rng.integers(-4, 5), SIZE + rng.integers(-4, 5)), letter, fill=255, font=f,
                             anchor="mm")
    img = img.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR).resize((SIZE, SIZE), Image.BILINEAR)
    arr = np.asarray(img, np.float32) * rng.uniform(0.6, 1.0) + rng.normal(0, 8, (SIZE, SIZE))
    return np.repeat(np.clip(arr, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def _letters(letters: str, fonts: list[str], per_class: int, rng) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for ci, letter in enumerate(letters):
        for i in range(per_class):
            xs.append(_glyph(fonts[int(rng.integers(len(fonts)))], letter, rng))
            ys.append(ci)
    return np.stack(xs), np.asarray(ys)


def _pretrained_letters_backbone(path: str, fonts: list[str]) -> str:
    """A ReLU CNN without normalisation, pretrained on K-T: 0-255 RGB in, a 4x4x64 feature map out."""
    keras.utils.set_random_seed(0)
    x, y = _letters("KLMNOPQRST", fonts, 60, np.random.default_rng(0))
    image = keras.Input((SIZE, SIZE, 3), name="image")
    h = keras.layers.Rescaling(1 / 255.0)(image)
    for i, width in enumerate((16, 32, 64)):
        h = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"block{i}_conv")(h)
        h = keras.layers.MaxPooling2D(name=f"block{i}_pool")(h)
    backbone = keras.Model(image, h, name="letters_backbone")
    head = keras.layers.Dense(10, activation="softmax")(keras.layers.GlobalAveragePooling2D()(backbone.output))
    clf = keras.Model(image, head)
    clf.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    clf.fit(x.astype("float32"), y, batch_size=32, epochs=6, verbose=0)
    backbone.save(path)
    return path


def _write_task(root: str, fonts: list[str]) -> None:
    """A-J: train and val from the first fonts (5 a class each), test from fonts never seen in training."""
    from PIL import Image

    rng = np.random.default_rng(1)
    seen, unseen = fonts[: len(fonts) * 2 // 3], fonts[len(fonts) * 2 // 3:]
    for split, split_fonts, n in (("train", seen, 5), ("val", seen, 5), ("test", unseen, 12)):
        x, y = _letters("ABCDEFGHIJ", split_fonts, n, rng)
        for i, (img, label) in enumerate(zip(x, y)):
            d = os.path.join(root, split, "ABCDEFGHIJ"[label])
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{i:03d}.png"))


def _linear_probe(backbone_path: str, root: str) -> float:
    """The keras.io guide's frozen recipe on the same folders: Dropout 0.2, Dense, Adam 1e-3, 30 epochs, batch 16,
    the best validation epoch (the base is frozen in inference mode, so it is trained on its features)."""
    base = keras.models.load_model(backbone_path)
    feats = {}
    for split in ("train", "val", "test"):
        ds = keras.utils.image_dataset_from_directory(os.path.join(root, split), image_size=(SIZE, SIZE),
                                                      batch_size=64, shuffle=False, label_mode="categorical",
                                                      verbose=False)
        x = np.concatenate([np.asarray(keras.ops.mean(base(a, training=False), axis=(1, 2))) for a, _ in ds])
        feats[split] = (x, np.concatenate([b for _, b in ds]))
    keras.utils.set_random_seed(0)
    probe = keras.Sequential([keras.Input(feats["train"][0].shape[1:]), keras.layers.Dropout(0.2),
                              keras.layers.Dense(10, activation="softmax")])
    probe.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
    best = {"acc": -1.0, "w": None}

    def keep(epoch, logs):
        if logs["val_accuracy"] > best["acc"]:
            best["acc"], best["w"] = logs["val_accuracy"], probe.get_weights()

    probe.fit(*feats["train"], batch_size=16, epochs=30, validation_data=feats["val"], verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=keep)])
    probe.set_weights(best["w"])
    x, y = feats["test"]
    return float(np.mean(probe.predict(x, verbose=0).argmax(-1) == y.argmax(-1)))


def test_defaults_beat_the_frozen_linear_probe_on_letters_in_unseen_fonts(tmp_path):
    fonts = _fonts()
    backbone = _pretrained_letters_backbone(str(tmp_path / "letters_backbone.keras"), fonts)
    root = str(tmp_path / "letters-5")
    _write_task(root, fonts)
    probe = _linear_probe(backbone, root)
    cfg = FinetuneConfig(data=DataConfig(image_dir=root, image_size=SIZE), model=ModelConfig(base=backbone),
                         output_dir=str(tmp_path / "run"), seed=0)  # everything else: the defaults
    r = tlkit.finetune(cfg)
    acc = r.metrics["test"]["accuracy"]
    print(f"letters-5 through a K-T backbone: tlkit defaults {acc:.3f}, frozen linear probe {probe:.3f}")
    assert acc >= probe, (acc, probe)
    assert acc > 0.25  # chance is 0.1
    assert r.config.data.batch_size == 32 and r.history[0]["stage"] == "head"


def _folder_with_splits(root, n_train: int, classes=("a", "b"), size=(24, 24)) -> str:
    from conftest import write_image_folder

    per = -(-n_train // len(classes))
    write_image_folder(os.path.join(root, "train"), classes=classes, per_class=per, size=size, seed=1)
    write_image_folder(os.path.join(root, "val"), classes=classes, per_class=3, size=size, seed=2)
    write_image_folder(os.path.join(root, "test"), classes=classes, per_class=3, size=size, seed=3)
    return str(root)


def test_the_optimizer_steps_once_per_batch_on_a_folder_with_its_own_splits(tmp_path, tiny_backbone):
    root = _folder_with_splits(tmp_path / "data", 50)  # 50 training images, batch 32: 2 batches an epoch
    cfg = FinetuneConfig(
        data=DataConfig(image_dir=root, image_size=32, batch_size=32, augment="none"),
        model=ModelConfig(base=tiny_backbone, weights="none"),
        train=TrainConfig(strategy="full", epochs=3, schedule="cosine", lr=1e-3),
        runtime=RuntimeConfig(precision="float32", xla="off"), output_dir=str(tmp_path / "run"), seed=0)
    r = tlkit.finetune(cfg)
    # The learning rate at the start of each epoch is the schedule at the optimizer's step count: with one step per
    # batch it is the cosine at steps 0, 2, 4 of 6 (Keras 3.15 counted 3 steps an epoch on such a folder).
    total = 6
    expected = [1e-3 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * s / total))) for s in (0, 2, 4)]
    np.testing.assert_allclose([row["lr"] for row in r.history], expected, rtol=1e-4)


def test_a_few_shot_folder_smaller_than_the_batch_runs(tmp_path, tiny_backbone, capsys):
    root = _folder_with_splits(tmp_path / "data", 10, classes=("a", "b", "c", "d", "e"))  # 2 a class
    cfg = FinetuneConfig(
        data=DataConfig(image_dir=root, image_size=32),  # the default batch of 32 > 10 images
        model=ModelConfig(base=tiny_backbone, weights="none"), train=TrainConfig(epochs=1, head_steps=5),
        runtime=RuntimeConfig(precision="float32", xla="off"), output_dir=str(tmp_path / "run"), seed=0)
    r = tlkit.finetune(cfg)
    assert "batch size 32 is larger than the training split (10 images): using 10" in capsys.readouterr().out
    assert r.config.data.batch_size == 10
    assert [row["stage"] for row in r.history] == ["head", "finetune"]  # --epochs 1 is one epoch of fine-tuning
    assert os.path.isfile(os.path.join(r.run_dir, "model.keras"))


@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_the_head_starts_at_chance_whatever_the_scale_of_the_features(tmp_path, scale):
    """Standardised features and zero logits: the first loss is ln(C) for a backbone whose features are ~1 or ~50."""
    from tlkit.models.backbones import get_backbone
    from tlkit.engine.setup import build_model
    from tlkit.core.runtime import setup
    from tlkit.data import load_sources, make_dataset

    image = keras.Input((32, 32, 3))
    feat = keras.layers.Conv2D(8, 3, activation="relu", kernel_initializer=keras.initializers.Constant(scale / 27))(
        keras.layers.Rescaling(1 / 255.0)(image))
    path = str(tmp_path / "scaled.keras")
    keras.Model(image, feat).save(path)
    root = _folder_with_splits(tmp_path / "data", 12, classes=("a", "b", "c"))
    cfg = FinetuneConfig(data=DataConfig(image_dir=root, image_size=32, batch_size=4), model=ModelConfig(base=path))
    spec, rt = get_backbone(path), setup(RuntimeConfig(precision="float32", xla="off"))
    data = load_sources(cfg.data, 32, 0)
    plain = make_dataset(data.train, 32, 4, 3)
    clf, feats = build_model(spec, spec.build(32, "imagenet"), 3, cfg, 32, rt, plain, None)
    model = clf.model
    probs = np.concatenate([np.asarray(model(x)) for x, _ in plain])
    np.testing.assert_allclose(probs, 1 / 3, atol=1e-6)  # zero logits: every class equally likely, loss ln 3
    z = np.asarray(model.get_layer("feature_norm")(feats.x_train))
    np.testing.assert_allclose(z[:, z.std(0) > 0].mean(0), 0, atol=1e-4)  # standardised training features
    np.testing.assert_allclose(z.std(0)[z.std(0) > 0], 1, atol=1e-2)
    assert float(np.abs(feats.x_train).max()) > scale * 0.1  # the raw features really were at that scale


def test_folding_the_standardisation_into_the_logits_keeps_the_outputs(tiny_backbone):
    """What the TFLite export converts: feature_norm folded into the Dense (int8 then has no amplifying layer)."""
    from tlkit.models.backbones import get_backbone
    from tlkit.models.classifier import build_classifier, fold_feature_norm

    spec = get_backbone(tiny_backbone)
    rng = np.random.default_rng(0)
    dim = int(spec.build(32, "none").output_shape[-1])
    model = build_classifier(spec, 4, ModelConfig(base=tiny_backbone, weights="none"), 32,
                             feature_stats=(rng.normal(0, 3, dim), rng.uniform(0.01, 20, dim)))
    logits = model.get_layer("logits")
    logits.set_weights([rng.normal(0, 1, logits.kernel.shape).astype("float32"), rng.normal(0, 1, 4).astype("float32")])
    folded = fold_feature_norm(model)
    assert "feature_norm" not in [layer.name for layer in folded.layers]
    x = rng.uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(folded(x)), np.asarray(model(x)), atol=1e-5)


def _pretrained_shapes_backbone(path: str) -> str:
    """A ReLU CNN without normalisation pretrained on the built-in `shapes` (outlines of four shapes in colour)."""
    from tlkit.data.shapes import make_shapes

    keras.utils.set_random_seed(0)
    x, y = make_shapes(100, SIZE, seed=0)
    image = keras.Input((SIZE, SIZE, 3), name="image")
    h = keras.layers.Rescaling(1 / 255.0)(image)
    for i, width in enumerate((16, 32, 64)):
        h = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"block{i}_conv")(h)
        h = keras.layers.MaxPooling2D(name=f"block{i}_pool")(h)
    backbone = keras.Model(image, h, name="shapes_backbone")
    head = keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling2D()(backbone.output))
    clf = keras.Model(image, head)
    clf.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    clf.fit(x.astype("float32"), y, batch_size=32, epochs=5, verbose=0)
    backbone.save(path)
    return path


def _write_letters_task(root: str, fonts: list[str], per_class: int, letters: str = "ABCDEF") -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    seen, unseen = fonts[: len(fonts) * 2 // 3], fonts[len(fonts) * 2 // 3:]
    for split, split_fonts, n in (("train", seen, per_class), ("val", seen, per_class), ("test", unseen, 15)):
        x, y = _letters(letters, split_fonts, n, rng)
        for i, (img, label) in enumerate(zip(x, y)):
            d = os.path.join(root, split, letters[label])
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{i:03d}.png"))


def test_far_transfer_the_default_moves_the_backbone_beyond_its_probe(tmp_path):
    """Features that transfer poorly (a CNN pretrained on coloured shapes, used on letters in unseen fonts): the
    default recipe must not stay a linear probe. It has to beat the same run's head stage (the probe on the frozen
    backbone, `--strategy feature_extraction`) by a clear margin, by training the backbone."""
    fonts = _fonts()
    backbone = _pretrained_shapes_backbone(str(tmp_path / "shapes_backbone.keras"))
    root = str(tmp_path / "letters-20")
    _write_letters_task(root, fonts, per_class=20)
    base = FinetuneConfig(data=DataConfig(image_dir=root, image_size=SIZE), model=ModelConfig(base=backbone), seed=0,
                          output_dir=str(tmp_path / "probe"))
    probe = tlkit.finetune(dataclasses.replace(base, train=TrainConfig(strategy="feature_extraction")))
    auto = tlkit.finetune(dataclasses.replace(base, output_dir=str(tmp_path / "auto")))  # every flag at its default
    p, a = probe.metrics["test"]["accuracy"], auto.metrics["test"]["accuracy"]
    recipe = auto.metrics["recipe"]
    print(f"letters through a shapes backbone: probe {p:.3f}, default {a:.3f}; {recipe['summary']}")
    assert recipe["stage"] is not None and recipe["stage"]["trainable"] is None  # the whole backbone trained
    assert a >= p + 0.15, (a, p)
