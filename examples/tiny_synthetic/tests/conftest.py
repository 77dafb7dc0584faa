import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.conftest import tiny_config, tiny_model, tiny_processor  # noqa: E402, F401  (the suite's fixtures)
