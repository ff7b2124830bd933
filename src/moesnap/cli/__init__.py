"""The ``moesnap`` command line: parses arguments and calls :mod:`moesnap.run`; one module per
command group (``main``: the parser, ``model make``, ``trace``; ``check``, ``compare``,
``goldens``, ``calibrate``) and ``_options`` for what several share.  Nothing below imports it.
"""

from .main import main

__all__ = ["main"]
