"""TensorFlow's start-up lines, filtered: `import_tensorflow()` imports TensorFlow and Keras once, quietly.

Importing TensorFlow 2.21 prints a screen of C++ log lines on stderr before its own logging is set up
(`TF_CPP_MIN_LOG_LEVEL` cannot reach them): the absl "All log messages before absl::InitializeLog()" banner,
"Could not find cuda drivers" on a machine without a GPU, the CPU-instructions notice, "failed call to
cuInit". `import_tensorflow` captures file descriptor 2 while TensorFlow and Keras load and the devices are
listed, then writes back every line that is not one of these known notices, so a real error still shows.
`TLKIT_TF_LOGS=1` turns the filter off.

Example:
    from tlkit.core.quiet import import_tensorflow
    tf = import_tensorflow()
"""
from __future__ import annotations

import os
import re
import sys
import tempfile

NOISE = re.compile("|".join([
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"cudart_stub\.cc.*Could not find cuda drivers",
    r"cpu_feature_guard\.cc.*This TensorFlow binary is optimized",
    r"^To enable the following instructions: .*rebuild TensorFlow",
    r"cuda_platform\.cc.*failed call to cuInit",
    r"cuda_executor\.cc.*could not open file to read NUMA node",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation_placer\.cc.*computation placer already registered",
    r"oneDNN custom operations are on",
    r"TF-TRT Warning: Could not find TensorRT",
    r"^E0000 00:00:\d+\.\d+ +\d+ cuda_blas\.cc",
]))

_done = False


def import_tensorflow():
    """Imports TensorFlow and Keras (once) with their start-up notices filtered out; returns `tensorflow`."""
    global _done
    if _done or os.environ.get("TLKIT_TF_LOGS", "").strip() in ("1", "true", "yes"):
        import tensorflow as tf

        _done = True
        return tf
    _done = True
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (some notebook front-ends): nothing to filter
        import tensorflow as tf

        return tf
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf
            import keras  # noqa: F401

            tf.config.list_physical_devices()  # the CUDA probe logs here, once
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines()
                    if line.strip() and not NOISE.search(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
    return tf
