"""`python -m prompttune <verb>`: the same entry point as the `prompttune` console script."""

from .cli import main

raise SystemExit(main())
