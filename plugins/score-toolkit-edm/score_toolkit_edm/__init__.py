"""score-toolkit-edm: EDM's samplers (Karras et al. 2022) as a score_toolkit plugin.

Nothing needs to be imported: installing the distribution registers the sampler through the
entry-point group ``score_toolkit.samplers``::

    from score_toolkit import get_sampler
    sampler = get_sampler("edm_heun", num_steps=18)
"""

from .heun import EDMHeunSampler

__all__ = ["EDMHeunSampler"]
__version__ = "0.1.0"
