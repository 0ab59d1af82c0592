"""Fine-tune on your own images through the Python API: train, evaluate, predict.

Usage:
    python examples/custom_folder.py IMAGES [--base resnet50] [--epochs 10] [--output-dir runs/my-images]

`IMAGES` holds one sub-folder per class (`IMAGES/cat/*.jpg`, `IMAGES/dog/*.png`, ...), or `train/`, `val/` and
`test/` sub-folders that each hold class sub-folders. Without a `val/` folder, a stratified 10% of the
training images is held out for validation. Unreadable files are skipped and listed.

Smoke mode (`TLKIT_SMOKE=1`): without IMAGES it writes a small folder of real JPEG/PNG files itself, and uses a
tiny `.keras` backbone with random weights at 32 px, so it runs in seconds on a CPU with nothing downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

import tlkit
from tlkit import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from tlkit.testing import is_smoke


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="?", help="Folder of class sub-folders (optional in smoke mode).")
    parser.add_argument("--base", default="resnet50", help="Backbone name or PATH.keras. Default: resnet50.")
    parser.add_argument("--epochs", type=int, default=10, help="Fine-tuning epochs after the head warm-up.")
    parser.add_argument("--output-dir", default=None, help="Run folder. Default: runs/<base>-<folder>-<time>.")
    args = parser.parse_args(argv)

    if is_smoke():
        from tlkit.testing import make_tiny_backbone, write_image_folder

        work = tempfile.mkdtemp(prefix="tlkit-custom-")
        images = args.images or write_image_folder(os.path.join(work, "images"), ("red", "green", "blue"), per_class=8)
        data = DataConfig(image_dir=images, image_size=32, batch_size=8, val_split=0.25, augment="light")
        model = ModelConfig(base=make_tiny_backbone(os.path.join(work, "tiny.keras")), weights="none")
        train = TrainConfig(strategy="two_stage", head_steps=1, epochs=1)
        output_dir = args.output_dir or os.path.join(work, "run")
    else:
        if not args.images:
            parser.error("give the folder of your images (or set TLKIT_SMOKE=1 for a demo)")
        data = DataConfig(image_dir=args.images, image_size=224, batch_size=32, augment="standard")
        model = ModelConfig(base=args.base, weights="imagenet")
        train = TrainConfig(strategy="two_stage", head_steps=300, epochs=args.epochs, optimizer="adamw",
                            lr=1e-3, weight_decay=1e-4)
        output_dir = args.output_dir

    # 1. Train: the same call as `tlkit finetune --image-dir IMAGES ...`.
    result = tlkit.finetune(FinetuneConfig(data=data, model=model, train=train, output_dir=output_dir))
    print(f"classes: {result.class_names}")

    # 2. Evaluate the saved model on the held-out split (the test split when IMAGES has test/).
    metrics = tlkit.evaluate(result.run_dir, result.config.data, split="test", seed=result.config.seed)
    print(f"{metrics['split']}: top-1 {metrics['accuracy']:.3f}, mean per-class {metrics['mean_per_class_accuracy']:.3f} "
          f"on {metrics['num_examples']} images")

    # 3. Predict a few files with the saved model: plain Keras, raw RGB 0-255 in, probabilities out.
    import keras

    clf = keras.models.load_model(os.path.join(result.run_dir, "model.keras"), safe_mode=True)
    size = int(clf.input_shape[1])
    root = result.config.data.image_dir
    files = []
    for name in result.class_names:
        folder = os.path.join(root, name) if os.path.isdir(os.path.join(root, name)) else os.path.join(root, "train", name)
        files += [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:1]]
    batch = np.stack([keras.utils.img_to_array(keras.utils.load_img(f, target_size=(size, size))) for f in files])
    probs = clf.predict(batch, verbose=0)
    print(f"{'file':40s} {'predicted':12s} probability")
    for f, p in zip(files, probs):
        print(f"{os.path.relpath(f, root)[:40]:40s} {result.class_names[int(p.argmax())]:12s} {p.max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
