from forkproxy.cli import main

raise SystemExit(main())
