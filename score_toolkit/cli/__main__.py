"""``python -m score_toolkit.cli COMMAND ...`` (also under ``accelerate launch ... -m score_toolkit.cli``)."""

import sys

from . import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
