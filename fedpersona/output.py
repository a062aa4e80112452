"""One line per event: the logging and warning set-up of a process, called by entry points only.

* **One handler.** The root logger gets a single plain handler (stderr). Flower's logger
  (``flwr``) carries its own colour handler *and* propagates to the root, and ``import opacus``
  adds a root handler of its own (``logging.basicConfig`` at import): each Flower line came out
  twice. Flower's handler is removed (its records reach the root handler once), and the root
  handler is installed with ``force=True`` first, so Opacus's ``basicConfig`` finds it and
  does nothing.
* **No ANSI codes.** Our format has none; Ray's coloured worker prefixes are turned off
  (``RAY_COLOR_PREFIX=0``) unless stderr is a terminal; tqdm progress bars are off.
* **Warnings** go through the same handler as one line each (no source line under them), each
  distinct text once per process. Filtered: only notices a user cannot act on
  (:data:`IGNORED`: transformers' deprecation notices about its own internals, Ray's accelerator
  tip). Privacy and security warnings (Opacus's "Secure RNG turned off", DP or secure
  aggregation switched off, ...) are never filtered.

:func:`configure_worker` does the same in a simulation's worker processes (a Ray setup hook;
the level comes from ``$FEDPERSONA_LOG_LEVEL``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LOG_LEVEL_ENV = "FEDPERSONA_LOG_LEVEL"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"

#: (message regex, category, module regex) of third-party warnings a user cannot act on.
IGNORED: tuple[tuple[str, type[Warning], str], ...] = (
    (r"", FutureWarning, r"transformers(\..*)?$"),
    (r"", DeprecationWarning, r"transformers(\..*)?$"),
    (r"Tip: In future versions of Ray, Ray will no longer override accelerator", FutureWarning, r""),
)
#: The same for child processes (``PYTHONWARNINGS`` takes literal message prefixes and exact modules).
IGNORED_ENV = (
    "ignore::FutureWarning:transformers.modeling_utils",
    "ignore:Tip:FutureWarning",  # fields are split on ':', so only the start of Ray's "Tip: In future ..."
)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (a live display may redirect it), never colours."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler sets it; the property wins
        pass


class _OncePerText(logging.Filter):
    """Drops a warning whose text was already shown by this process (the same warning from two call sites)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "py.warnings":
            return True
        text = record.getMessage()
        if text in self._seen:
            return False
        self._seen.add(text)
        return True


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message}"


def configure(level: int = logging.WARNING) -> None:
    """Set up this process's logging and warnings as described in the module docstring."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    handler.setLevel(level)  # propagated records skip the root logger's level, not its handlers'
    handler.addFilter(_OncePerText())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    _single_flower_handler()
    for name in ("alembic", "filelock", "urllib3", "httpx", "matplotlib", "PIL", "fsspec"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    os.environ[LOG_LEVEL_ENV] = logging.getLevelName(level)
    # tqdm bars (transformers' "Loading weights", Flower Datasets' partitioning) would garble a live
    # display and fill files with carriage returns. tqdm reads TQDM_DISABLE when it is imported: keep
    # this before any import of it.
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        os.environ.setdefault(var, "1")
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    ignore_unactionable_warnings()
    warnings.formatwarning = _one_line  # type: ignore[assignment]
    logging.captureWarnings(True)


def ignore_unactionable_warnings() -> None:
    """Filter :data:`IGNORED` here and in child processes (``PYTHONWARNINGS``)."""
    for message, category, module in IGNORED:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    present = [p for p in os.environ.get("PYTHONWARNINGS", "").split(",") if p]
    os.environ["PYTHONWARNINGS"] = ",".join(present + [p for p in IGNORED_ENV if p not in present])


def _single_flower_handler() -> None:
    """Remove Flower's own console handler: its records propagate to the root handler instead."""
    from flwr.supercore.logger import FLOWER_LOGGER, ConsoleHandler

    for h in list(FLOWER_LOGGER.handlers):
        if isinstance(h, ConsoleHandler):
            FLOWER_LOGGER.removeHandler(h)
    FLOWER_LOGGER.propagate = True


def configure_worker() -> None:
    """:func:`configure` in a worker process, at the level of the entry point that started it."""
    name = os.environ.get(LOG_LEVEL_ENV, "WARNING")
    level = logging.getLevelName(name)
    configure(level if isinstance(level, int) else logging.WARNING)
