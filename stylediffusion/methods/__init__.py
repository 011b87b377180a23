"""Every inversion and edit method, registered here explicitly (how to add one: docs/methods.md).

The registry is filled when this package is imported: each method module only defines its classes,
and the ``register`` lines below are the one list of what exists (in the order ``--list_methods``
shows them, which is also the order an edit defined for every inversion lists them in).
"""
from . import attention_edits, builtin, directinv, elite, generated, npi, nulltext, sdedit, spdinv, stylediffusion_plus
from .registry import (
                       EDITS,
                       INVERSIONS,
                       EditMethod,
                       InversionMethod,
                       Inverted,
                       MethodContext,
                       MethodOption,
                       MethodOutput,
                       check_method_options,
                       default_inversion,
                       describe_methods,
                       edit_loop_inputs,
                       get_edit,
                       get_inversion,
                       register,
                       run_method,
)

register(builtin.StyleDiffusionInversion())
register(stylediffusion_plus.StyleDiffusionPlusInversion())
register(builtin.DDIMInversion())
register(nulltext.NullTextInversion())
register(npi.NegativePromptInversion())
register(npi.ProximalNegativePromptInversion())
register(directinv.DirectInversion())
register(spdinv.SourcePromptDisentangledInversion())
register(generated.GeneratedImage())

register(builtin.PromptToPromptEdit())
register(builtin.WordSwapEdit())
register(attention_edits.FPEEdit())
register(attention_edits.MasaCtrlEdit())
register(attention_edits.PlugAndPlayEdit())
register(sdedit.SDEditEdit())
register(elite.EliteEdit())

__all__ = ["EDITS", "INVERSIONS", "EditMethod", "InversionMethod", "Inverted", "MethodContext", "MethodOption",
           "MethodOutput", "check_method_options", "default_inversion", "describe_methods", "edit_loop_inputs",
           "get_edit", "get_inversion", "register", "run_method"]
