"""``python -m mapnet_tune.cli``: how worker processes are started."""

from mapnet_tune.cli import main

main()
