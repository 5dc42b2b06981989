"""fedbits: federated fine-tuning of language models over very little bandwidth."""

import logging

__version__ = "0.1.0"

# A library prints nothing unless the program using it configures logging (the command
# line does, see fedbits.logs); without this, Python would print our warnings anyway.
logging.getLogger("fedbits").addHandler(logging.NullHandler())
