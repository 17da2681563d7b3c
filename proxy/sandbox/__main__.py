from proxy.sandbox.cli import main

raise SystemExit(main())
