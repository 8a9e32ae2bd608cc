"""Exceptions that carry a one-line, user-facing message."""


class MdmfError(Exception):
    """Base class: the CLI prints ``str(err)`` as one line (traceback only with --debug)."""


class ConfigError(MdmfError, ValueError):
    """Bad option values or combinations."""


class DatasetError(MdmfError):
    """Split files or video trees that cannot be used."""


class VideoReadError(MdmfError):
    """A video that cannot be decoded (missing, truncated, zero frames, unknown container)."""


class CacheError(MdmfError):
    """A cache that is missing, incomplete, or was made with different settings."""


class TrainingError(MdmfError):
    """Training that cannot go on: its loss or weights stopped being finite (what was kept is named)."""


def keep_ctrl_c() -> None:
    """Make a Ctrl-C impossible to lose in this process.

    Python swallows an exception raised inside a finalizer or a weakref callback: it prints "Exception ignored in
    ..." and goes on. A Ctrl-C whose signal lands while the garbage collector runs such a callback (SQLAlchemy,
    under Optuna, registers them) would vanish, and a sweep would run on to its last trial. The hook puts the
    interrupt back on the main thread once the main thread has left the hook (raised inside the hook, it would be
    swallowed again); should it land in another callback, the hook runs again.
    """
    import _thread
    import sys
    import threading
    import time

    previous = sys.unraisablehook
    if getattr(previous, "keeps_ctrl_c", False):
        return
    main = threading.main_thread().ident

    def in_hook() -> bool:
        frame = sys._current_frames().get(main)
        while frame is not None:
            if frame.f_code is hook.__code__:
                return True
            frame = frame.f_back
        return False

    def interrupt_when_out() -> None:
        while in_hook():
            time.sleep(0.001)
        _thread.interrupt_main()

    def hook(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            threading.Thread(target=interrupt_when_out, name="ctrl-c", daemon=True).start()
            return
        previous(unraisable)

    hook.keeps_ctrl_c = True
    sys.unraisablehook = hook
