import sys
from pathlib import Path

# the project is a flat directory of modules: make them importable however pytest is started
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
