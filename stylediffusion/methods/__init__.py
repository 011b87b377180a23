"""Every inversion and edit method behind one registry (see ``registry.py``)."""
from .registry import (EDITS, INVERSIONS, EditMethod, InversionMethod, Inverted, MethodContext, MethodOutput,
                       describe_methods, get_edit, get_inversion, run_method)

__all__ = ["EDITS", "INVERSIONS", "EditMethod", "InversionMethod", "Inverted", "MethodContext", "MethodOutput",
           "describe_methods", "get_edit", "get_inversion", "run_method"]
