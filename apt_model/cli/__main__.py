import sys

from apt_model.cli import main

sys.exit(main())
