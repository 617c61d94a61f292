from aisemble.cli.main import main

raise SystemExit(main())
