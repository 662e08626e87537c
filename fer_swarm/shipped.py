"""Where the model files the project ships are found, in a checkout and in an installed wheel.

They live in the repository's top-level ``models/``. A checkout (or an
editable install) reads them there; a wheel installs the same files as data
under ``<prefix>/share/fer-swarm/models`` (pyproject.toml, data-files),
because ``models/`` is not part of the ``fer_swarm`` package.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT_MODELS = Path(__file__).resolve().parent.parent / "models"
INSTALLED_MODELS = Path(sys.prefix) / "share" / "fer-swarm" / "models"


def shipped(name: str) -> Path:
    """The shipped file ``name``: the checkout's copy if there is one, else the installed one.

    Returns the checkout's path when neither exists, so the error that follows names the place a
    developer would look.
    """
    for folder in (CHECKOUT_MODELS, INSTALLED_MODELS):
        if (folder / name).is_file():
            return folder / name
    return CHECKOUT_MODELS / name
