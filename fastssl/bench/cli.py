"""``fastssl bench``: see :mod:`fastssl.bench.runner`."""
from .runner import add_arguments, run  # noqa: F401
