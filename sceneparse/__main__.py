import sys

from sceneparse.cli.main import main

sys.exit(main())
