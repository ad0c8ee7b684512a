"""The test suite, laid out like the package; shared helpers live at this level."""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
