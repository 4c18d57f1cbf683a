"""Progress of long work, from Ray workers to the console: one line per training run, quietly.

Ray's own worker output (its internal logs, library warnings) is not forwarded to the driver by default
(:mod:`props_ray.ray_runtime`); what a user reads instead travels here. Workers and trial tasks post
small events to a named Ray actor, the *board*, that the driver starts; the driver's :class:`Console`
polls it and draws

- one line per training run (its stage, epoch, step, loss or epsilon, pairs/s and ETA), redrawn in
  place on a terminal and printed once, with its totals, when the run ends elsewhere;
- the job's own messages (``say``), as they come.

Without a board (a loop started by hand, a unit test) an event prints as a plain line. Events carry
metrics only: never a prompt, response or label.
"""

from __future__ import annotations

import sys
import threading
import time

BOARD = "props-ray-progress"
_handle = None
_looked = 0.0  # when this process last looked for the board and found none


class _Board:
    """The actor: a queue of events, drained by the driver."""

    def __init__(self):
        self.events: list[dict] = []

    def post(self, event: dict) -> None:
        self.events.append(event)

    def drain(self) -> list[dict]:
        out, self.events = self.events, []
        return out


def _board():
    global _handle, _looked
    if _handle is None and time.time() - _looked > 5.0:
        try:
            import ray

            if ray.is_initialized():
                _handle = ray.get_actor(BOARD)
        except (ValueError, ImportError):
            _handle = None
        if _handle is None:
            _looked = time.time()
    return _handle


def post(event: dict) -> None:
    """Send ``event`` to the console (fire and forget); print it where there is no board."""
    board = _board()
    if board is None:
        print(format_event(event), flush=True)
    else:
        board.post.remote({**event, "time": time.time()})


def say(text: str) -> None:
    """A message for the console, from the driver, a trial task or a worker."""
    post({"kind": "line", "text": text})


def status(text: str) -> None:
    """What is happening now (a trial starting): drawn in place on a terminal, not printed elsewhere."""
    post({"kind": "status", "text": text})


def step(run: str, **fields) -> None:
    """A training run's progress: stage, epoch, epochs, step, pairs (seen so far), total_pairs, and any of
    loss, epsilon, reward_accuracy, reward."""
    post({"kind": "step", "run": run, **fields})


def end(run: str, what: str, seconds: float | None = None, label: str | None = None) -> None:
    """A training run finished (in ``seconds``, start-up included): the console prints its totals as
    ``[label] what: ...`` (``label`` defaults to the run's name)."""
    post({"kind": "end", "run": run, "what": what, "seconds": seconds, "label": label or run})


# -- rendering (driver side) ----------------------------------------------------------------------

def _metrics(e: dict) -> str:
    parts = []
    if e.get("loss") is not None:
        parts.append(f"loss {e['loss']:.4f}")
    if e.get("reward") is not None:
        parts.append(f"reward {e['reward']:.3f}")
    if e.get("epsilon") is not None:
        parts.append(f"ε {e['epsilon']:.3f}")
    return ", ".join(parts)


def _rate(e: dict, run: dict | None) -> float | None:
    """Pairs (or prompts) a second since the run's first step event, or None before a second one."""
    if run is None or not e.get("pairs") or e["time"] <= run["t0"]:
        return None
    return (e["pairs"] - run["p0"]) / (e["time"] - run["t0"])


def format_event(e: dict, run: dict | None = None) -> str:
    """One event as a line (a step line has its rate and ETA once ``run``, its first step, is known)."""
    if e["kind"] in ("line", "status"):
        return e["text"]
    if e["kind"] == "end":
        return f"[{e.get('label') or e['run']}] {e['what']}" + (
            f" in {e['seconds']:.1f}s" if e.get("seconds") is not None else "")
    where = f"stage {e.get('stage', 1)} epoch {e.get('epoch', 0) + 1}/{e.get('epochs', 1)} step {e.get('step', 0)}"
    line = f"[{e['run']}] {where}"
    m = _metrics(e)
    if m:
        line += f": {m}"
    rate = _rate(e, run)
    if rate:
        line += f" · {rate:,.0f}/s"
        total = e.get("total_pairs")
        if total and total > e["pairs"]:
            line += f" · ETA {(total - e['pairs']) / rate:.0f}s"
    return line


class Console:
    """The driver's side: starts the board, polls it from a thread and draws the lines.

    ``live``: redraw each run's line in place (a terminal); otherwise a run prints one line when it ends.
    """

    def __init__(self, out=None, live: bool | None = None, interval: float = 0.5):
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self.interval = interval
        self.runs: dict[str, dict] = {}  # run -> its first step's time and pairs, and its last event
        self._drawn = False  # a live line is on screen
        self._stop = threading.Event()
        self._thread = None
        self._actor = None

    def start(self) -> "Console":
        import ray

        global _handle, _looked
        _looked = 0.0
        try:
            self._actor = ray.get_actor(BOARD)
        except ValueError:
            self._actor = ray.remote(num_cpus=0)(_Board).options(name=BOARD, lifetime=None).remote()
        _handle = self._actor
        self._thread = threading.Thread(target=self._poll, name="props-ray-console", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        global _handle
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.render(self._drain())
        self._clear()
        _handle = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _drain(self) -> list[dict]:
        import ray

        try:
            return ray.get(self._actor.drain.remote(), timeout=10)
        except Exception:  # the cluster is going away; what was not drawn is lost, not the job
            return []

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.render(self._drain())

    # -- drawing -------------------------------------------------------------------------------
    def _clear(self) -> None:
        if self._drawn:
            self.out.write("\r\033[K")
            self._drawn = False

    def _print(self, line: str) -> None:
        self._clear()
        self.out.write(line + "\n")
        self.out.flush()

    def render(self, events: list[dict]) -> None:
        for e in events:
            kind = e.get("kind")
            if kind == "line":
                self._print(e["text"])
            elif kind == "status":
                if self.live:
                    self._clear()
                    self.out.write(e["text"])
                    self.out.flush()
                    self._drawn = True
            elif kind == "step":
                run = self.runs.setdefault(e["run"], {"t0": e["time"], "p0": e.get("pairs") or 0})
                run["last"] = e
                if self.live:
                    self._clear()
                    self.out.write(format_event(e, run))
                    self.out.flush()
                    self._drawn = True
            elif kind == "end":
                run = self.runs.pop(e["run"], None)
                self._print(self.summary(e, run))

    @staticmethod
    def summary(e: dict, run: dict | None) -> str:
        """A finished run's line: steps, time, rate and its last metrics."""
        if run is None:
            return format_event(e)
        last = run["last"]
        line = f"[{e.get('label') or e['run']}] {e['what']}: {last.get('step', 0)} steps"
        if e.get("seconds") is not None:
            line += f" in {e['seconds']:.1f}s"
        rate = _rate(last, run)
        if rate:
            line += f" ({rate:,.0f}/s)"
        m = _metrics(last)
        return line + (f", {m}" if m else "")
