from voicegrow.cli import main

raise SystemExit(main())
