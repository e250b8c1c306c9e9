from driftsync.cli import main

raise SystemExit(main())
