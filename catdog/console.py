"""Where output goes: catdog's own lines to the console, Ray's own output to a log file.

Ray prints a lot on a driver: its loggers (``ray``, ``ray.data``, ``ray.train``), every worker's
stdout/stderr forwarded by ``log_to_driver`` (Train V2 controller chatter, Ray Data progress from
the SplitCoordinator actor, deprecation warnings from Ray internals), and Python warnings raised
inside Ray.  :func:`ray_output` sends all of that to one log file and keeps the console for the
lines catdog writes itself:

- on the driver: the ``catdog`` logger (stderr) and the job's result (stdout);
- on workers: lines written with :func:`emit` (or catdog warnings, through :func:`worker_logging`)
  carry :data:`MARK`, and the driver prints them without Ray's ``(pid=...)`` prefix.

``--verbose`` or ``CATDOG_VERBOSE=1`` keeps Ray's defaults (its bars, logs and warnings on the console).
Used by every job (train, predict, evaluate) through :func:`catdog.runtime.init_ray`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path

from catdog.storage import Storage, is_remote, join

VERBOSE_ENV = "CATDOG_VERBOSE"
# Prefix of the lines a worker means for the console; the driver strips it.
MARK = "[catdog] "
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
_DISPATCHER_HANDLER = "ray_print_logs"  # name Ray registers its log_to_driver printer under


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def emit(text: str, err: bool = False) -> None:
    """A line for the person at the console, from a Ray worker (or the driver).  Written to the
    stream, not ``print``ed: in its workers Ray Train replaces ``print`` with one that also logs each
    call to stderr, so every epoch line reached the console twice."""
    stream = sys.stderr if err else sys.stdout
    stream.write(MARK + text + "\n")
    stream.flush()


class _MarkedHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        emit(f"{record.levelname.lower()}: {record.name}: {record.getMessage()}", err=True)


def worker_logging() -> None:
    """In a Ray worker: catdog warnings and errors reach the driver's stderr (once per process)."""
    catdog_logger = logging.getLogger("catdog")
    if not any(isinstance(h, _MarkedHandler) for h in catdog_logger.handlers):
        handler = _MarkedHandler(level=logging.WARNING)
        catdog_logger.addHandler(handler)
        catdog_logger.propagate = False


def _strip_mark(line: str) -> str | None:
    return line[len(MARK) :] if line.startswith(MARK) else None


def _dispatch(data: dict, log, passthrough, show_bars: bool) -> None:
    """Replacement for Ray's log_to_driver printer: catdog lines to the console, the rest to ``log``."""
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its periodic status dump: keep only the events, as Ray does
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    ray_lines = []
    for line in lines:
        own = _strip_mark(line)
        if own is not None:
            print(own, file=sys.stderr if data.get("is_err") else sys.stdout, flush=True)
        elif RAY_TQDM_MAGIC in line:
            if show_bars:
                ray_lines.append(line)
        else:
            ray_lines.append(line)
    if not ray_lines:
        return
    if passthrough is not None:
        passthrough({**data, "lines": data.get("lines", []) if data.get("pid") == "autoscaler" else ray_lines})
        return
    who = data.get("actor_name") or data.get("task_name") or ""
    where = "" if data.get("ip") == data.get("localhost") else f", ip={data.get('ip')}"
    prefix = f"({who} pid={data.get('pid')}{where})"
    for line in ray_lines:
        if RAY_TQDM_MAGIC in line:
            from ray._private.worker import process_tqdm

            process_tqdm(line)
        else:
            log.write(f"{prefix} {line}\n")
    log.flush()


def _quiet_ray_loggers(handler: logging.Handler) -> list:
    """Send the ``ray*`` loggers to ``handler``; return what to restore."""
    import ray.data  # noqa: F401  (configures the ray.data logger; must happen before we replace it)

    saved = []
    for name in RAY_LOGGERS:
        ray_logger = logging.getLogger(name)
        saved.append((ray_logger, list(ray_logger.handlers), ray_logger.propagate))
        for old in list(ray_logger.handlers):
            ray_logger.removeHandler(old)
        ray_logger.addHandler(handler)
        ray_logger.propagate = False
    return saved


def _ray_warning_filter(log):
    """Python warnings raised inside Ray go to ``log``; every other warning is shown as usual."""
    ray_root = str(Path(__import__("ray").__file__).parent)
    original = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(ray_root):
            log.write(warnings.formatwarning(message, category, filename, lineno, line))
            log.flush()
        else:
            original(message, category, filename, lineno, file, line)

    return original, showwarning


class LogFile:
    """Ray's log: written from Ray's log thread and the driver; :meth:`move` carries what it
    holds to its final place once that folder exists (the run folder is made after Ray starts)."""

    def __init__(self, path: str):
        self.lock = threading.Lock()
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a")  # noqa: SIM115 (closed in close)

    def write(self, text: str) -> None:
        with self.lock:
            self.handle.write(text)

    def flush(self) -> None:
        with self.lock:
            self.handle.flush()

    def move(self, path: str) -> None:
        with self.lock:
            self.handle.close()
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as target, open(self.path) as source:
                shutil.copyfileobj(source, target)
            Path(self.path).unlink()
            self.path, self.handle = path, open(path, "a")  # noqa: SIM115

    def close(self) -> None:
        with self.lock:
            self.handle.close()


@contextlib.contextmanager
def ray_output(log: LogFile | None, *, quiet: bool | None = None):
    """Route Ray's own output to ``log`` while the block runs (Ray may start inside it).

    ``quiet=None`` follows ``--verbose`` / ``CATDOG_VERBOSE``. In verbose mode only the
    :data:`MARK` prefix is stripped from worker lines; Ray prints everything else itself."""
    from ray._private import ray_logging
    from ray.data import DataContext

    quiet = (not verbose()) if quiet is None else quiet
    dispatcher = ray_logging.global_worker_stdstream_dispatcher
    if not quiet or log is None:
        with _dispatcher_swapped(dispatcher, None, passthrough=True, show_bars=True):
            yield
        return
    context = DataContext.get_current()
    saved_context = (context.use_ray_tqdm, context.enable_progress_bars)
    # Ray Data's progress becomes periodic log lines (not redrawn bars) wherever stdout is not a
    # TTY, which is the case in every Ray worker; a TTY driver would draw bars, so it has none.
    context.use_ray_tqdm = False
    context.enable_progress_bars = not sys.stdout.isatty()
    file_handler = logging.StreamHandler(log)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved_loggers = _quiet_ray_loggers(file_handler)
    original_showwarning, showwarning = _ray_warning_filter(log)
    warnings.showwarning = showwarning
    try:
        with _dispatcher_swapped(dispatcher, log, passthrough=False, show_bars=sys.stdout.isatty()):
            yield
    finally:
        warnings.showwarning = original_showwarning
        for ray_logger, handlers, propagate in saved_loggers:
            ray_logger.removeHandler(file_handler)
            for handler in handlers:
                ray_logger.addHandler(handler)
            ray_logger.propagate = propagate
        context.use_ray_tqdm, context.enable_progress_bars = saved_context


class _Dispatch:
    """Stands in for Ray's log_to_driver printer (``ray_printer``)."""

    def __init__(self, ray_printer, log, passthrough: bool, show_bars: bool):
        self.ray_printer, self.log, self.passthrough, self.show_bars = ray_printer, log, passthrough, show_bars

    def __call__(self, data: dict) -> None:
        _dispatch(data, self.log, self.ray_printer if self.passthrough else None, self.show_bars)


@contextlib.contextmanager
def _dispatcher_swapped(dispatcher, log, passthrough: bool, show_bars: bool):
    """Wrap Ray's log_to_driver printer now, and whenever ``ray.init`` registers it inside the block."""

    def wrap(name, fn):
        return _Dispatch(fn, log, passthrough, show_bars) if name == _DISPATCHER_HANDLER else fn

    original_add = dispatcher.add_handler
    with dispatcher._lock:
        saved = list(dispatcher.handlers)
        dispatcher.handlers = [(name, wrap(name, fn)) for name, fn in saved]
    dispatcher.add_handler = lambda name, fn: original_add(name, wrap(name, fn))
    try:
        yield
    finally:
        del dispatcher.add_handler  # back to the class method
        with dispatcher._lock:
            dispatcher.handlers = [
                (name, fn.ray_printer if isinstance(fn, _Dispatch) else fn) for name, fn in dispatcher.handlers
            ]


class JobLog:
    """Where a job's Ray log is, and :meth:`settle`, which moves it into the output folder.
    With ``--verbose`` there is no log file: Ray's output stays on the console."""

    def __init__(self, storage: Storage, uri: str):
        self.storage, self.uri = storage, uri
        name = uri.split("://", 1)[-1].strip("/").replace("/", "_")
        temp = os.path.join(tempfile.gettempdir(), "catdog-logs", f"{os.getpid()}-{name}")
        self.file = None if verbose() else LogFile(temp)
        self.settled = False

    @property
    def where(self) -> str:
        if self.file is None:
            return "the console (verbose)"
        return self.uri if not is_remote(self.uri) else f"{self.uri} (written at the end; meanwhile {self.file.path})"

    def settle(self) -> None:
        """Call once the output folder may exist: a local log moves there now; a remote one is
        copied there when the job ends."""
        self.settled = True
        if self.file is not None and not is_remote(self.uri):
            self.file.move(self.uri)

    def close(self) -> None:
        if self.file is None:
            return
        self.file.close()
        if self.settled and is_remote(self.uri):
            self.storage.write_bytes(self.uri, Path(self.file.path).read_bytes())
            Path(self.file.path).unlink()


@contextlib.contextmanager
def job_log(storage: Storage, folder_uri: str, job: str):
    """Ray's own output for ``job`` goes to ``<folder_uri>/logs/<job>.log``; yields a :class:`JobLog`.

    Until :meth:`JobLog.settle` (the output folder is only made once the job's checks pass),
    the log is a local file under the temp folder; a job that stops before then leaves it there.
    With remote storage (``s3://``) the log stays local while the job runs and is copied to the
    output folder when it ends, also when it fails."""
    log = JobLog(storage, join(folder_uri, "logs", f"{job}.log"))
    try:
        with ray_output(log.file):
            yield log
    finally:
        log.close()


def duration(seconds: float) -> str:
    """``75`` → ``1:15``; ``3725`` → ``1:02:05``."""
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
