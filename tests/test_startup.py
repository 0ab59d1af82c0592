"""Start-up: `tlkit --help` answers without TensorFlow, the public names load lazily, and TensorFlow's
start-up notices are filtered (`tlkit/__init__.py`, `tlkit/cli.py`, `tlkit/core/quiet.py`)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_and_import_do_not_load_tensorflow():
    r = _run("import sys, tlkit, tlkit.cli\n"
             "for argv in (['--help'], ['finetune', '--help'], ['prune', '--help'], ['bogus']):\n"
             "    tlkit.cli.main(argv)\n"
             "print('LOADED', sorted(m for m in ('tensorflow', 'keras', 'matplotlib', 'sklearn') if m in sys.modules))")
    assert "LOADED []" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert "--head-steps" in r.stdout  # finetune's help was printed in full


def test_public_names_resolve_lazily():
    import tlkit

    missing = [n for n in tlkit.__all__ if not hasattr(tlkit, n)]
    assert not missing
    from tlkit.verbs.finetune import finetune

    assert tlkit.finetune is finetune
    import tlkit.verbs.evaluate  # noqa: F401  (a submodule of the same name as the function)
    from tlkit.verbs.evaluate import evaluate

    assert tlkit.evaluate is evaluate and callable(tlkit.predict) and callable(tlkit.export)
    assert "finetune" in dir(tlkit)
    try:
        tlkit.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_tensorflow_start_up_notices_are_filtered_but_errors_are_not():
    from tlkit.core.quiet import NOISE

    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796128349.743772    4310 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU "
        "will not be used.",
        "I0000 00:00:1796128300.271544    3469 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
        "available CPU instructions in performance-critical operations.",
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the "
        "appropriate compiler flags.",
        "E0000 00:00:1796128838.139979   24448 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
    ]
    assert all(NOISE.search(line) for line in noise)
    kept = ["ImportError: libcudnn.so.9: cannot open shared object file",
            "E0000 00:00:1796128838.1 24448 some_op.cc:52] Out of memory while allocating"]
    assert not any(NOISE.search(line) for line in kept)
    r = _run("", "-m", "tlkit", "info", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "absl::InitializeLog" not in r.stderr and "cudart_stub" not in r.stderr, r.stderr[-2000:]
    assert '"versions"' in r.stdout
