import sys
from pathlib import Path

# tests/netlab.py, services.py and client.py are shared by the tests and bench/
sys.path.insert(0, str(Path(__file__).resolve().parent))
