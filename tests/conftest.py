import os
import sys

# Shared model builders live next to this file; make `import builders` work from any test folder.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("GRAPH_OPT_PROGRESS", "0")
