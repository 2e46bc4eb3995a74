import sys

from graph_opt.cli import main

sys.exit(main())
