from kubetune.localcluster.cli import main

raise SystemExit(main())
