"""``python -m dsfast.train --config run.yaml [key=value ...]`` (what deepspeed/torchrun launch)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
