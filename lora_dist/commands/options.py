"""The command-line idiom of every command: an `Options` dataclass whose fields become flags.

The machinery lives in `lora_dist.settings` (core, so that the training layer's own settings
class can use it too); commands import it from here. See that module for the idiom.
"""

from lora_dist.settings import (
    OneLineParser,
    Options,
    add_flags,
    attribute_docs,
    from_args,
    option,
)

__all__ = ["OneLineParser", "Options", "add_flags", "attribute_docs", "from_args", "option"]
