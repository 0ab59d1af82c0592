"""setup.cfg: the installed versions satisfy the declared floors and pins, and the code's newest APIs exist.

A floor that is too low is a promise the code breaks (`keras>=3.3` while the augmentation uses CutMix, new in
3.9); a missing ceiling lets a release with different private modules in. This reads setup.cfg and checks
every installed requirement against it, and checks that the APIs the floors were chosen for are there.
"""
import configparser
import importlib.metadata as md
import os

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements(section: str, key: str) -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    return [Requirement(line.strip()) for line in cfg[section][key].splitlines() if line.strip()]


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def test_every_install_requirement_is_installed_and_satisfied():
    for req in _requirements("options", "install_requires"):
        version = _installed(req.name)
        assert version is not None, f"{req.name} is required by setup.cfg but not installed"
        assert req.specifier.contains(version, prereleases=True), \
            f"installed {req.name} {version} does not satisfy setup.cfg's {req}"


@pytest.mark.parametrize("extra", ["dev", "hub", "litert", "tensorboard", "onnx", "mediapipe"])
def test_installed_extras_satisfy_their_floors(extra):
    for req in _requirements("options.extras_require", extra):
        version = _installed(req.name)
        if version is not None:  # an extra need not be installed; when it is, it must fit
            assert req.specifier.contains(version, prereleases=True), \
                f"installed {req.name} {version} does not satisfy setup.cfg's [{extra}] {req}"


def test_floors_are_not_below_what_the_code_uses():
    reqs = {r.name: r for r in _requirements("options", "install_requires")}

    def floor(name):
        return min(Version(s.version) for s in reqs[name].specifier if s.operator in (">=", "=="))

    assert floor("keras") >= Version("3.9")  # keras.layers.CutMix (tlkit/data/augment.py)
    assert floor("keras-tuner") >= Version("1.4.6")  # the first KerasTuner on Keras 3
    assert any(s.operator == "<" for s in reqs["keras-tuner"].specifier)  # private modules: a ceiling
    assert any(s.operator == "<" for s in reqs["keras"].specifier)  # private optimizer and saving internals
    import keras

    for name in ("CutMix", "MixUp", "RandAugment"):
        assert hasattr(keras.layers, name)


def test_keras_tuner_private_modules_tlkit_imports_exist():
    from keras_tuner.src import config  # noqa: F401
    from keras_tuner.src.distribute import oracle_chief, utils  # noqa: F401
    from keras_tuner.src.engine import tuner_utils
    from keras_tuner.engine.trial import TrialStatus  # noqa: F401  (public)
    import keras_tuner

    assert hasattr(tuner_utils, "SaveBestEpoch")
    assert hasattr(keras_tuner.Tuner, "_configure_tensorboard_dir")
    assert hasattr(keras_tuner.Tuner, "_build_hypermodel")


def test_keras_private_internals_tlkit_uses_exist():
    """What the ceiling on keras protects (setup.cfg's comment): the optimizer hooks of models/param_groups.py and
    the saving internals of engine/weights_format.py."""
    import keras
    from keras.src.saving import saving_lib

    assert callable(getattr(saving_lib, "_save_state", None))
    for opt in (keras.optimizers.SGD, keras.optimizers.AdamW):
        assert callable(getattr(opt, "update_step", None)) and callable(getattr(opt, "_apply_weight_decay", None))
        assert callable(getattr(opt, "_update_model_variables_moving_average", None))  # engine/ema.py
    for name in ("_swap_variables", "_finalize_ema_values"):
        assert callable(getattr(keras.callbacks.SwapEMAWeights, name, None)), name


def test_every_private_api_named_in_core_private_exists():
    """`tlkit/core/private.py` names every private module, class attribute and hook tlkit uses: each must exist in
    the installed Keras, KerasTuner and TensorFlow (an upgrade that drops one fails here, not in a user's run)."""
    import importlib

    import keras
    import keras_tuner

    from tlkit.core import private

    for table in (private.KERAS_MODULES, private.KERAS_TUNER_MODULES, private.TENSORFLOW_MODULES):
        for module, names in table.items():
            mod = importlib.import_module(module)
            for name in names:
                assert hasattr(mod, name), f"{module}.{name}"
    for path, names in private.KERAS_ATTRIBUTES.items():
        cls = keras
        for part in path.split(".")[1:]:
            cls = getattr(cls, part)
        for name in names:
            assert hasattr(cls, name), f"{path}.{name}"
    for name in private.KERAS_TUNER_TUNER_HOOKS:
        assert callable(getattr(keras_tuner.Tuner, name, None)), name
    # the attributes that exist only on instances
    x = keras.Input((2,))
    model = keras.Model(x, keras.layers.Dense(1)(x))
    instances = {"KerasTensor": model.outputs[0], "functional Model": model, "Layer in a functional Model":
                 model.layers[-1]}
    for kind, obj in instances.items():
        for name in private.KERAS_INSTANCE_ATTRIBUTES[kind]:
            assert hasattr(obj, name), f"{kind}: {name}"
    opt = keras.optimizers.SGD(use_ema=True)
    opt.build(model.trainable_variables)
    for name in private.KERAS_INSTANCE_ATTRIBUTES["Optimizer(use_ema=True)"]:
        assert hasattr(opt, name), name
    assert private.keras_saving_lib() is not None and len(private.all_layers(model)) == 2


def test_private_modules_are_imported_in_core_private_only():
    """Private modules of Keras, KerasTuner and TensorFlow are imported in `core/private.py` only."""
    root = os.path.join(ROOT, "tlkit")
    for folder, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py") or f == "private.py":
                continue
            with open(os.path.join(folder, f), encoding="utf-8") as fh:
                text = fh.read()
            for mod in ("keras.src", "keras_tuner.src", "tensorflow.python"):
                assert f"from {mod}" not in text and f"import {mod}" not in text, f"{f} imports {mod}"


def test_package_version_matches_setup_cfg():
    from tlkit.core import VERSION

    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    assert parser["metadata"]["version"] == VERSION
