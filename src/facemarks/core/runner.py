"""Run a stage or command so that expected failures end in one clear line and a non-zero exit."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from facemarks.core.io import DataError
from facemarks.core.params import ParamsError


def run(main: Callable[[], object]) -> None:
    """Call ``main``; a :class:`ParamsError` exits 2, a :class:`DataError` or ``RuntimeError`` exits 1, one line each."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except ParamsError as exc:
        print(f"facemarks: bad parameter: {exc}", file=sys.stderr)
        sys.exit(2)
    except (DataError, RuntimeError, FileNotFoundError) as exc:
        print(f"facemarks: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
