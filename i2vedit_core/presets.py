"""Numerics presets: "default" (this project's choices) and "official" (the official I2VEdit code's).

One setting, shared by the Python API, the command line (`--numerics`) and the nodes, that switches
every numerical choice where the official code differs from our defaults and the difference is a
choice rather than a library bug (docs/FIDELITY.md gives each one and why the default differs):

  source_step_offset 1      the edit at step k matches the source attention of sigma_{k+1};
  stage-2 exception         up_blocks.1.attentions.2 keeps the edit's own temporal attention in stage 2;
  threshold ramp f/F        thr(f) = thr0 + (thr1 - thr0)·f/F;
  cond_8bit                 inversion conditioning from two SARP'd copies of frame 0 after a uint8 round trip;
  vae_sample                inversion start latent drawn from the VAE posterior with the seeded generator.
"""

from dataclasses import replace

from .attention.temporal import OFFICIAL_STAGE2_EXCEPTIONS

NUMERICS = ("default", "official")


def with_numerics(settings, name: str):
    """`settings` (a PipelineSettings) with the named numerics; the user's other choices are kept."""
    if name not in NUMERICS:
        raise ValueError(f"unknown numerics {name!r}: use one of {list(NUMERICS)}")
    official = name == "official"
    matching = settings.edit.matching
    temporal = replace(matching.temporal, stage2_exceptions=OFFICIAL_STAGE2_EXCEPTIONS if official else ())
    edit = replace(settings.edit, source_step_offset=int(official),
                   matching=replace(matching, temporal=temporal, official_ramp=official))
    inversion = replace(settings.inversion, cond_8bit=official, vae_sample=official)
    return replace(settings, edit=edit, inversion=inversion)


def numerics_of(settings) -> str:
    """The name of the numerics `settings` run with, or "custom" for a mix."""
    for name in NUMERICS:
        if with_numerics(settings, name) == settings:
            return name
    return "custom"
