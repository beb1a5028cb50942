"""``python -m pipeline`` is the ``pipeline`` command."""

from .cli import main

if __name__ == "__main__":
    main()
