"""Numerics presets: "default" (this project's choices) and "official" (the official I2VEdit code's).

One setting, shared by the Python API, the command line (`--numerics`) and the nodes, that switches
every numerical choice where the official code differs from our defaults and the difference is a
choice rather than a library bug (docs/FIDELITY.md gives each one and why the default differs):

  source_step_offset 1      the edit at step k matches the source attention of sigma_{k+1};
  stage-2 exception         up_blocks.1.attentions.2 keeps the edit's own temporal attention in stage 2;
  threshold ramp f/F        thr(f) = thr0 + (thr1 - thr0)·f/F;
  cond_8bit                 inversion conditioning from two SARP'd copies of frame 0 after a uint8 round trip;
  vae_sample                inversion start latent drawn from the VAE posterior with the seeded generator.

On the nodes the setting is the `numerics` widget of I2VEdit Invert and I2VEdit Edit Video; Propagate
and the Matched Sampler follow the inversion they are given. ComfyUI's VAE gives only the posterior
mode, so there "official" is every choice above but vae_sample.
"""

from dataclasses import replace

from .attention.temporal import OFFICIAL_STAGE2_EXCEPTIONS

NUMERICS = ("default", "official")


def with_numerics(settings, name: str, posterior_sample: bool = True):
    """`settings` (a PipelineSettings) with the named numerics; the user's other choices are kept.

    posterior_sample False: a host whose VAE gives only the posterior mode (ComfyUI's) keeps the mode;
    every other official choice still applies ("official" on the nodes, docs/FIDELITY.md).
    """
    official = is_official(name)
    inversion = replace(settings.inversion, cond_8bit=official, vae_sample=official and posterior_sample)
    return replace(settings, edit=edit_with_numerics(settings.edit, name), inversion=inversion)


def edit_with_numerics(edit, name: str):
    """The edit's share of the named numerics (EditSettings): source σ offset, stage-2 exception, ramp."""
    official = is_official(name)
    matching = edit.matching
    temporal = replace(matching.temporal, stage2_exceptions=OFFICIAL_STAGE2_EXCEPTIONS if official else ())
    return replace(edit, source_step_offset=int(official),
                   matching=replace(matching, temporal=temporal, official_ramp=official))


def inversion_numerics(inversion) -> str:
    """The numerics an inversion was made with (InversionSettings): its edits follow them, so the
    setting is chosen once, where the inversion is made (I2VEdit Invert)."""
    return "official" if inversion.cond_8bit else "default"


def is_official(name: str) -> bool:
    if name not in NUMERICS:
        raise ValueError(f"unknown numerics {name!r}: use one of {list(NUMERICS)}")
    return name == "official"


def numerics_of(settings) -> str:
    """The name of the numerics `settings` run with, or "custom" for a mix."""
    for name in NUMERICS:
        if with_numerics(settings, name) == settings:
            return name
    return "custom"
