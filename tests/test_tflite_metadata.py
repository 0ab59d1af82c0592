"""tlkit/engine/tflite_metadata.py and core/sidecars.py: TFLite exports that MediaPipe Tasks load and name.

Three exports (float, float16, int8) of one run share a folder; MediaPipe Tasks' ImageClassifier opens each,
names the classes and gives `tlkit.predict`'s top-1 and probabilities on real PNG files.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import tlkit
from tlkit import cli
from tlkit.engine import tflite_metadata

QUANTIZATIONS = ("none", "float16", "int8")
# |p_mediapipe - p_tlkit|: the same file through the same kernels; int8 outputs are steps of 1/256.
TOLERANCE = {"none": 1e-4, "float16": 1e-4, "int8": 2.5 / 256}


@pytest.fixture(scope="module")
def exports(tiny_backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("tflite_md")
    run = str(root / "run")
    assert cli.main(["finetune", "--base", tiny_backbone, "--weights", "none", "--dataset", "shapes", "--image-size",
                     "32", "--strategy", "feature_extraction", "--epochs", "2", "--shapes-per-class", "8", "--augment", "none",
                     "--output-dir", run]) == 0
    # A decisive head by construction (a few dozen shapes train a near-uniform one): random logits weights on the
    # standardised features, so that int8's steps of 1/256 leave most top-1s untied.
    import keras

    path = os.path.join(run, "model.keras")
    model = keras.models.load_model(path)
    dense = model.get_layer("logits")
    kernel = np.random.default_rng(0).normal(0.0, 0.5, dense.kernel.shape).astype("float32")
    dense.set_weights([kernel, np.zeros(dense.bias.shape, "float32")])
    model.save(path)
    folder = root / "exports"
    for q in QUANTIZATIONS:  # one folder for all three: each has its own sidecars
        tlkit.export(run, format="tflite", quantize=q, output=str(folder / f"{q}.tflite"), calibration_steps=8,
                     num_check=8, verbose=False)
    return run, str(folder)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> list[str]:
    """Real PNG files at the model's size (32x32: MediaPipe's own resize is not the pipeline's)."""
    from PIL import Image

    from tlkit.data.shapes import make_shapes

    x, _ = make_shapes(3, 32, seed=7)
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i, img in enumerate(x):
        paths.append(str(folder / f"img{i:02d}.png"))
        Image.fromarray(np.asarray(img, np.uint8)).save(paths[-1])
    return paths


def test_three_exports_share_a_folder_with_their_own_sidecars(exports):
    run, folder = exports
    names = sorted(os.listdir(folder))
    for q in QUANTIZATIONS:
        for suffix in (".tflite", ".export.json", ".labels.txt", ".model_card.md"):
            assert f"{q}{suffix}" in names
        with open(os.path.join(folder, f"{q}.export.json"), encoding="utf-8") as f:
            info = json.load(f)
        assert info["quantize"] == q and info["check"]["passed"] and info["metadata"]["written"] is True
        assert info["load_path"].endswith(f"{q}.tflite")
    assert "export.json" not in names and "labels.txt" not in names
    # a second export of the same name is refused, of another name accepted
    assert cli.main(["export", run, "--format", "tflite", "--output", os.path.join(folder, "none.tflite")]) == 2


@pytest.mark.parametrize("quantize", QUANTIZATIONS)
def test_mediapipe_image_classifier_loads_names_and_agrees(exports, pngs, quantize):
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    _, folder = exports
    path = os.path.join(folder, f"{quantize}.tflite")
    clf = tlkit.load(path)
    assert clf.class_names == ["circle", "square", "triangle", "cross"]
    ours = tlkit.predict(path, pngs, top_k=4)
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=path), max_results=-1)
    with vision.ImageClassifier.create_from_options(options) as mp_clf:
        decided = 0
        for pred in ours.predictions:
            cats = mp_clf.classify(mp.Image.create_from_file(pred.file)).classifications[0].categories
            theirs = {c.category_name: c.score for c in cats}
            assert set(theirs) == set(clf.class_names)  # the labels travel inside the file
            probs = dict(pred.top)
            for name, p in probs.items():
                assert abs(theirs[name] - p) <= TOLERANCE[quantize], (pred.file, name, theirs[name], p)
            (first, p1), (_, p2) = pred.top[0], pred.top[1]
            if p1 - p2 > 2 * TOLERANCE[quantize]:  # not a tie: the same top-1
                assert cats[0].category_name == first, (pred.file, cats[0].category_name, first)
                decided += 1
        assert decided >= len(pngs) // 2


def test_metadata_says_normalisation_name_and_labels(exports, tmp_path):
    _, folder = exports
    md = json.loads(tflite_metadata.metadata_json(os.path.join(folder, "none.tflite")))
    assert md["name"] == "run" and "4 classes" in md["description"] and "shapes" in md["description"]
    image = md["subgraph_metadata"][0]["input_tensor_metadata"][0]
    norm = image["process_units"][0]["options"]
    assert norm["mean"] == [0.0] and norm["std"] == [1.0]  # the model takes RGB 0..255
    out = md["subgraph_metadata"][0]["output_tensor_metadata"][0]
    assert out["associated_files"][0]["name"] == "labels.txt"
    assert md["min_parser_version"] == "1.0.0"  # the shim's answer for an image classifier
    # a bare copy, without its sidecars, still names its classes (from the packed labels)
    bare = tmp_path / "alone.tflite"
    shutil.copy(os.path.join(folder, "int8.tflite"), bare)
    assert tlkit.load(str(bare)).class_names == ["circle", "square", "triangle", "cross"]
    assert tflite_metadata.labels_from_tflite(str(bare)) == ["circle", "square", "triangle", "cross"]


def test_version_shim_follows_the_parser_rules():
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb
    import flatbuffers

    def version(md):
        b = flatbuffers.Builder(0)
        b.Finish(md.Pack(b), b"M001")
        return tflite_metadata._version_of(bytes(b.Output()))

    md = fb.ModelMetadataT()
    sg = fb.SubGraphMetadataT()
    md.subgraphMetadata = [sg]
    assert version(md) == "1.0.0"
    vocab = fb.AssociatedFileT()
    vocab.name, vocab.type = "vocab.txt", fb.AssociatedFileType.VOCABULARY
    md.associatedFiles = [vocab]
    assert version(md) == "1.0.1"
    group = fb.TensorGroupT()
    group.name = "g"
    sg.outputTensorGroups = [group]
    assert version(md) == "1.2.0"
