"""The mixer registry lives in its own module so mixer files can import it without import cycles."""
from longlm.registry import Registry

MIXERS = Registry("mixer")
