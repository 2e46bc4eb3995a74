import os
import sys

# Shared model builders live next to this file; make `import builders` work from any test folder.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("GRAPH_OPT_PROGRESS", "0")

# Sensitivity curves (graph_opt/budget.py) are cached on disk: never in the user's home from a test.
import tempfile

os.environ["GRAPH_OPT_CACHE"] = tempfile.mkdtemp(prefix="graph-opt-test-cache-")
