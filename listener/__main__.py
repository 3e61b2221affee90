"""`python -m listener` runs the `sandbox-listener` command line."""

from listener.cli import main

raise SystemExit(main())
