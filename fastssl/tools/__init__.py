"""The ``fastssl`` CLI and its tooling (``fastssl info | bench | profile | train | gpu-report |
augment-demo``): ``cli`` (the entry point, commands imported lazily), ``info``, ``bench`` (the
benchmark harness), ``profiling``, ``training``, ``gpu_report``, ``augment_demo``. Nothing here
is needed to use the ops."""
