from paradec.cli import main

raise SystemExit(main())
