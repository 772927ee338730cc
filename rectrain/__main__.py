from rectrain.cli import main

raise SystemExit(main())
