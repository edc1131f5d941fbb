"""A thread's build in progress: what it changed in the process, and when that ends.

A hand-written build starts at ``tg.Input`` (or at an operation on a value of a finished build) and
ends at ``tg.Model``; ``tg.from_module``, a replayed config and tg.optimize's recordings are builds
that end when their call returns. While it lasts a build owns per-thread state: its dims' probe sizes
(NOTE: [Probe sizes] in dims.py) and the build hold (NOTE: [finfo of a stand-in] in type_info.py:
torch.finfo's replacement and the returned-inputs hook). This module says when that state is given
back even if ``tg.Model`` never comes (NOTE: [End of a build]).

Example:
    >>> import gc, torch, torch.nn as nn, torchgraph as tg
    >>> x = tg.Input(shape=(4,))
    >>> torch.finfo is tg.type_info._REAL["finfo"]  # a build is in progress
    False
    >>> try:
    ...     nn.Linear(5, 3)(x)
    ... except tg.GraphBuildError:
    ...     pass
    >>> del x; _ = gc.collect()  # no value of the failed build is left: the build is over
    >>> torch.finfo is tg.type_info._REAL["finfo"]
    True
"""

from __future__ import annotations

import sys
import threading
import weakref

__all__ = ["Build", "building_now", "current_build", "end_build", "note_failure", "supersede_failed_build",
           "track_record"]

# NOTE: [End of a build]
# A build can finish only while some value of it is alive: tg.Model needs its inputs and outputs.
# So besides tg.Model (and a failed tg.Model, tg.from_module or replay, which end their build in a
# `finally`), a build ends when the last record it made is garbage collected: every Record made
# while the thread holds the build hold is watched through a weak reference, and the last one's
# callback ends the build (drops the hold, so the `torch` module's class and its finfo are torch's
# own again and the process-wide hook is removed; the next tg.Input starts with fresh dims). A
# failed layer call, user code raising between layers, or a tg.Input never turned into a model
# thus leave nothing behind once their symbolic tensors are gone (`del x`, the function that built
# them returned or raised).
# Why not end the build at the failure itself: code may catch a GraphBuildError and go on building
# with the same inputs (`try: y = layer(x) except GraphBuildError: y = other(x)`), and a build
# without its hold would silently lose a layer that returns its input (NOTE: [Returned inputs]).
# Limits, and why: records point at their values and values at their records, so a build's records
# die at a garbage collection, not at the `del` (Python's gc runs on its own as objects are made;
# gc.collect() forces it). An exception's traceback keeps the frames it passed, and their symbolic
# tensors: in an interactive session sys.last_traceback keeps a failed build's values, and so the
# build, alive until the next tg.Input (below) or the next error replaces it (or `del
# sys.last_traceback, sys.last_value`, and sys.last_exc on Python 3.12+). Meanwhile the build is in
# progress as if the user still held it: torch.finfo and torch.compile work in that thread all the
# same (NOTE: [finfo of a stand-in] in type_info.py), though torch.compile(module) warns about a
# global module hook (the build's returned-inputs hook, NOTE: [Returned inputs]).
# Records made without the hold (a loaded model's `model.outputs`, rebuilt on demand) are not
# watched: they live as long as their model. Rebuilt during a build they are, and an abandoned build
# then lasts as long as that model.
# The one exception: an interactive session (the Python REPL, IPython/Jupyter) keeps the last uncaught
# exception in sys.last_value/last_exc and its traceback, so a build whose step failed there stays in
# progress, and the next tg.Input joined it: a dim re-declared with other bounds (tg.Dim("seq",
# max=64) after max=8) was refused as declared twice, and probe sizes depended on the failed build.
# So tg.Input first ends this thread's build if its last failure is the session's last exception
# (supersede_failed_build): the user saw the error at the prompt and starts anew. Values of the
# failed build that the user still holds stay usable, as values of a finished build are.
# The callback may run in any thread (wherever the gc runs); it only marks the build ended and drops
# the hold under the hold's lock; the owning thread starts a new Build when it next needs one. A step
# of a build (tg.Input, an operation recorded at the top level) pins it meanwhile, so that a build
# whose old values are collected during the step is not ended under it; a step that fails before
# making any record ends a build that has nothing else alive (a first tg.Input with a bad shape).


class Build:
    """One build's state in its thread: its dims (dims.py), its hold (type_info.py), its live records."""

    __slots__ = ("dims", "hold", "records", "ended", "failure", "_forget", "__weakref__")

    def __init__(self):
        self.dims = None  # dims.py's state of this build, made when first needed
        self.hold = None  # type_info.py's hold on torch.finfo's replacement, while held
        self.records: set[weakref.ref] = set()
        self.ended = False
        self.failure = None  # id() of the last error a step raised (an exception cannot be weakly referenced)
        me = weakref.ref(self)  # a weak one: a build left by its thread must still die (and drop its hold)

        def forget(ref, me=me, finalizing=sys.is_finalizing):
            build = me()
            if build is not None and not finalizing():  # at exit type_info's globals may be gone
                build.records.discard(ref)
                if not build.records:
                    build.end()

        self._forget = forget

    def watch(self, record) -> None:
        """Keep this build going while ``record`` lives (NOTE: [End of a build])."""
        self.records.add(weakref.ref(record, self._forget))

    def pin(self) -> object:
        """Keep this build going during one step of it (a tg.Input, a recorded operation), which may
        fail before it makes a record; give the pin back with :meth:`unpin`."""
        pin = object()
        self.records.add(pin)
        return pin

    def unpin(self, pin: object) -> None:
        """The step is over: a build that has no live record after it (its first step failed) ends."""
        self.records.discard(pin)
        if not self.records:
            self.end()

    def end(self) -> None:
        """The build is over: drop its hold; its thread starts the next build afresh."""
        self.ended = True
        hold, self.hold = self.hold, None
        if hold is not None:
            hold.drop()


class _Current(threading.local):
    build: Build | None = None


_CURRENT = _Current()


def current_build() -> Build:
    """This thread's build in progress (a new one if the last has ended)."""
    build = _CURRENT.build
    if build is None or build.ended:
        build = _CURRENT.build = Build()
    return build


def building_now() -> Build | None:
    """This thread's build if it holds the build hold, else None (never starts one)."""
    build = _CURRENT.build
    return build if build is not None and build.hold is not None else None


def end_build() -> None:
    """End this thread's build: the next one starts as in a fresh process."""
    build, _CURRENT.build = _CURRENT.build, None
    if build is not None:
        build.end()


def note_failure(exc: BaseException) -> None:
    """A step of this thread's build raised ``exc`` (it may still be caught and the build go on)."""
    build = _CURRENT.build
    if build is not None and not build.ended:
        build.failure = id(exc)


def supersede_failed_build() -> None:
    """Called by tg.Input: end this thread's build if its last failure is the interactive session's
    last uncaught exception (NOTE: [End of a build])."""
    build = _CURRENT.build
    if build is None or build.ended or build.failure is None:
        return
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    if last is not None and id(last) == build.failure:
        end_build()


def track_record(record) -> None:
    """Called for every new Record: one made while the thread holds the build hold keeps the build going."""
    build = _CURRENT.build
    if build is not None and build.hold is not None:
        build.watch(record)
