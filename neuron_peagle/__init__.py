"""P-EAGLE parallel speculative decoding for AWS Trainium, exact against the target model.

    from neuron_peagle import Engine, SamplingParams

    engine = Engine.from_pretrained()            # the embedded SmolLM2-135M-Instruct and its drafter
    print(engine.generate(["Explain KV caches."], SamplingParams(max_new_tokens=64))[0].text)

The public names load on first use, so that importing a submodule stays light.
"""

from __future__ import annotations

import importlib

_PUBLIC = {"Engine": "neuron_peagle.runtime.engine", "SamplingParams": "neuron_peagle.runtime.engine",
           "RequestOutput": "neuron_peagle.runtime.engine", "GenerationInterrupted": "neuron_peagle.runtime.engine",
           "SpeculationConfig": "neuron_peagle.speculation", "NeuronPeagleError": "neuron_peagle.errors"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'neuron_peagle' has no attribute {name!r}")
