from reolm.cli import main

raise SystemExit(main())
