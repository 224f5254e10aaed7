"""``fromzero ui``: a web interface to follow, compare, launch, stop and resume runs and to chat
with a model (:mod:`~fromzero.ui.app`; runs folder :mod:`~fromzero.ui.runs`, launching
:mod:`~fromzero.ui.launch`, chat :mod:`~fromzero.ui.chat`; pages in ``static/``)."""

from fromzero.ui.app import UIConfig, create_app, run_ui

__all__ = ["UIConfig", "create_app", "run_ui"]
