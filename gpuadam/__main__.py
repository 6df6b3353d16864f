from gpuadam.cli import main

raise SystemExit(main())
