"""``fastssl bench``: see :mod:`fastssl.tools.bench.runner`."""
from .runner import add_arguments, run  # noqa: F401
