"""`python -m pureapi`."""

from .cli import main

raise SystemExit(main())
