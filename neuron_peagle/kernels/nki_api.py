"""Where kernel code gets `nki`, `nl` and `nisa` from.

On a machine with the Neuron SDK these are the real `nki`, `nki.language` and `nki.isa`; elsewhere
they are the CPU interpreter's stand-ins (`interpreter.py`), so the same kernel source runs in both.
Kernel modules import the three names from here and use nothing else of NKI.
"""

from __future__ import annotations

try:
    import nki
    import nki.isa as nisa
    import nki.language as nl

    HAVE_NKI = True
except ImportError:
    from neuron_peagle.kernels.interpreter import nki, nisa, nl

    HAVE_NKI = False

__all__ = ["HAVE_NKI", "nki", "nisa", "nl"]
