"""The memory registry lives in its own module so memory files can import it without import cycles."""
from longlm.registry import Registry

MEMORIES = Registry("memory")
