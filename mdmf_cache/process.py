"""What the console entry and the processes it starts set up for their own life: a Ctrl-C that is never lost, and
an exit that does not walk every object of torch for garbage cycles."""

from __future__ import annotations

import atexit
import gc


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


def skip_the_exit_collection() -> None:
    """At this process's exit, collect what is garbage then, and freeze the rest out of the collections the
    interpreter runs as it shuts down: walking torch's and open_clip's objects there cost about 1 s of CPU at every
    exit (AMD EPYC), for objects that live to the end anyway (Python never promises their finalizers at exit).
    Registered once however often it is called; from an ``atexit`` handler, so a test that calls the console entry in
    its own process is not frozen."""
    atexit.unregister(_collect_then_freeze)
    atexit.register(_collect_then_freeze)


def _collect_then_freeze() -> None:
    gc.collect()
    gc.freeze()
