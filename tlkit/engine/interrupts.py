"""Ctrl-C and SIGTERM during training: stop at a clean point (the end of a batch), naming the run folder.

Example:
    with interruptible("runs/try", checkpoints.epochs_saved):
        run_stages(...)
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator


class Interrupted(KeyboardInterrupt):
    """Raised when a run is stopped by SIGINT (Ctrl-C) or SIGTERM; carries what is needed to resume.

    Attributes:
        signum: The signal number (`signal.SIGINT` or `signal.SIGTERM`).
        run_dir: The run folder, or `None` before it existed.
        epochs_done: Epochs saved in the last checkpoint (0 when none).
    """

    def __init__(self, signum: int = signal.SIGINT, run_dir: str | None = None, epochs_done: int = 0):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.run_dir, self.epochs_done = signum, run_dir, epochs_done

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + int(self.signum)


_pending: dict[str, int | None] = {"signum": None}


def _on_signal(signum, frame):
    """First Ctrl-C/SIGTERM: stop at the end of the current batch (a clean point); a second one: at once."""
    if _pending["signum"] is not None:
        raise Interrupted(signum)
    _pending["signum"] = signum
    print(f"\n[tlkit] {signal.Signals(signum).name}: stopping after the current batch (press Ctrl-C again to "
          "stop at once); the last finished epoch is kept.", flush=True)


def interrupt_pending() -> int | None:
    """The signal received inside `interruptible` and not yet acted on, or `None`."""
    return _pending["signum"]


def raise_if_interrupted() -> None:
    """Raises `Interrupted` when a signal arrived (called by `Checkpointer` after every batch)."""
    signum = _pending["signum"]
    if signum is not None:
        raise Interrupted(signum)



@contextlib.contextmanager
def interruptible(run_dir: str, epochs_saved: Callable[[str], int] = lambda run_dir: 0) -> Iterator[None]:
    """Turns Ctrl-C (SIGINT) and SIGTERM inside the block into `Interrupted`, naming the run folder to resume.

    The first signal only sets a flag: training stops at the end of the current batch (`Checkpointer`
    calls `raise_if_interrupted`), never inside a TensorFlow call, where an exception would surface as an
    unrelated `SystemError`. A second signal stops at once. The handlers are installed only in the main
    thread; the previous ones are put back afterwards.

    Args:
        run_dir: The run folder named in `Interrupted`.
        epochs_saved: `epochs_saved(run_dir)`, the epochs of its last checkpoint
            (`engine.checkpoints.epochs_saved`). Defaults to none saved.

    Example:
        with interruptible("runs/try", checkpoints.epochs_saved):
            run_stages(...)
    """
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _on_signal)
    _pending["signum"] = None
    try:
        yield
    except Interrupted as e:
        e.run_dir = e.run_dir or run_dir
        e.epochs_done = epochs_saved(run_dir)
        raise
    except KeyboardInterrupt:
        raise Interrupted(signal.SIGINT, run_dir, epochs_saved(run_dir)) from None
    except SystemError as e:  # a second Ctrl-C raised inside a TensorFlow call surfaces as SystemError
        if isinstance(e.__context__, KeyboardInterrupt) or _pending["signum"] is not None:
            raise Interrupted(_pending["signum"] or signal.SIGINT, run_dir, epochs_saved(run_dir)) from None
        raise
    finally:
        _pending["signum"] = None
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

