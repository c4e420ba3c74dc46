"""A quiet console: the product's own lines on stderr, Ray's and DeepSpeed's internal logs in a file under the
storage root (`<root>/logs/`), whose tail is shown when a command fails; `causvid --verbose` brings them back."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from infra import storage
from infra.redact import RedactingFilter

VERBOSE_ENV = "CAUSVID_VERBOSE"
INTERNAL_LOGGERS = ("ray", "ray.data", "deepspeed", "torch", "py.warnings")
QUIETED_LOGGERS = ("alembic", "mlflow", "urllib3", "botocore", "filelock")  # chatty at INFO, with handlers of their own
RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")
FAILURE_TAIL_LINES = 20

_internal_log: Path | None = None
_handler: logging.FileHandler | None = None
_ray_logs: Path | None = None


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def configure(*, quiet: bool, verbose_logs: bool) -> None:
    """The console's handler (secrets redacted) and, unless verbose, internal loggers held at warnings until
    :func:`capture_internal_logs` gives them their file."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname).1s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if verbose_logs:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))
    logging.captureWarnings(True)
    for name in INTERNAL_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def capture_internal_logs(root: str) -> Path | None:
    """Send the internal loggers to `<root>/logs/causvid-<time>-<pid>.log` (a local root only) instead of the console."""
    global _internal_log, _handler
    if verbose() or storage.is_s3(root) or _internal_log is not None:
        return _internal_log
    import ray.data  # noqa: F401  (Ray Data sets up its loggers on import; ours are added after)

    folder = Path(storage.normalize(root)) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"causvid-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    _handler = logging.FileHandler(path)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _handler.addFilter(RedactingFilter())
    _internal_log = path
    _route_internal_logs()
    return path


@contextlib.contextmanager
def ray_init_logs() -> Iterator[None]:
    """Around `ray.init`, which clears the `ray` logger's handlers (or gives it a console handler of its own): what
    Ray logs meanwhile would reach the console through Python's last-resort handler, so it goes to the file, and the
    internal loggers are pointed at the file again after."""
    previous = logging.lastResort
    logging.lastResort = _handler or previous
    try:
        yield
    finally:
        logging.lastResort = previous
        _route_internal_logs()


def _route_internal_logs() -> None:
    if _handler is None:
        return
    for name in INTERNAL_LOGGERS:
        logger = logging.getLogger(name)
        for console_handler in [h for h in logger.handlers if getattr(h, "stream", None) in (sys.stderr, sys.stdout)]:
            logger.removeHandler(console_handler)  # Ray's loggers come with console handlers of their own
        if _handler not in logger.handlers:
            logger.addHandler(_handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def link_ray_logs(session_logs: str) -> Path:
    """Where Ray's own logs of this run are (its session's `logs/`: the workers' output, the raylet's and GCS's
    logs), for the failure message; linked as `<root>/logs/ray-<session>` beside the internal log, so that a run's
    logs are all under its root."""
    global _ray_logs
    _ray_logs = Path(session_logs)
    if _internal_log is not None:
        link = _internal_log.parent / f"ray-{_ray_logs.parent.name}"
        if not link.is_symlink():
            link.symlink_to(_ray_logs, target_is_directory=True)
        _ray_logs = link
    return _ray_logs


def failure_tail(error: BaseException | None = None) -> str:
    """For the console when a command fails: the last lines of the internal log and of the Ray worker log of the
    failure (the failed task's process, else the worker log written last), and where all of Ray's logs are."""
    parts = [*_tail(_internal_log)] if _internal_log is not None else []
    if _ray_logs is not None and _ray_logs.is_dir():
        pid = getattr(error, "pid", None)
        logs = [p for p in _ray_logs.glob(f"worker-*-{pid}.err" if pid else "worker-*.err") if p.stat().st_size]
        if logs:
            parts.extend(_tail(max(logs, key=lambda p: p.stat().st_mtime)))
        parts.append(f"Ray's logs of this run: {_ray_logs}")
    return "\n".join(parts)


def _tail(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()[-FAILURE_TAIL_LINES:]
    return [f"--- last lines of {path} ---", *lines]
