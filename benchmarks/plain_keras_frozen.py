"""The plain-Keras baseline of `benchmarks/speed.py` (a) and (b): the keras.io transfer-learning guide's way.

`image_dataset_from_directory` (10% validation), ResNet50 without its top, frozen (`trainable = False`, called
with `training=False`), global average pooling, dropout, a softmax layer; Adam; `fit` for the given epochs.

Usage:
    python benchmarks/plain_keras_frozen.py IMAGE_DIR [--size 96] [--epochs 10] [--batch-size 32] [--weights none]
"""
from __future__ import annotations

import argparse
import time


def run(image_dir: str, size: int = 96, epochs: int = 10, batch_size: int = 32, weights: str | None = None,
        verbose: int = 2) -> float:
    """Builds and fits the frozen-base classifier; returns the seconds of `fit`."""
    import keras

    train, val = keras.utils.image_dataset_from_directory(
        image_dir, validation_split=0.1, subset="both", seed=42, image_size=(size, size), batch_size=batch_size,
        label_mode="categorical", verbose=False)
    base = keras.applications.ResNet50(weights=weights, include_top=False, input_shape=(size, size, 3))
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = keras.applications.resnet50.preprocess_input(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(len(train.class_names), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    t0 = time.perf_counter()
    model.fit(train, validation_data=val, epochs=epochs, verbose=verbose)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image_dir")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--weights", default="none", help="imagenet or none. Defaults to none (no download).")
    a = p.parse_args()
    seconds = run(a.image_dir, a.size, a.epochs, a.batch_size, None if a.weights == "none" else a.weights)
    print(f"fit: {seconds:.1f} s")


if __name__ == "__main__":
    main()
