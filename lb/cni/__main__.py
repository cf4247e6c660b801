"""`python -m lb.cni` (or the `bpflb-cni` console script): the plugin run directly, for a venv install.
The runtime on a node normally runs the static launcher instead (lb/cni/launcher.c)."""
from .plugin import main

main()
