"""Command-line front end. Each subcommand lives in its own module with a ``register``
function; commands import torch and the library lazily so ``--help`` is instant."""
