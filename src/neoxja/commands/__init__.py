"""Sub-commands of the ``neoxja`` CLI; each module has ``register(subparsers)``."""
