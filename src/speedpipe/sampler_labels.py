"""The one sampler-label grammar of the pipeline: <family><steps>[-cfg<scale>].

    ddpm<N>, ddim<N>   a diffusion model (a train run): DDPM ancestral (ADM respacing) or DDIM (trailing) in N steps
    scm<N>             a consistency model (a distill run, of any method in speedpipe.consistency.methods), N = 1, 2
    -cfg<scale>        classifier-free guidance of a diffusion sampler (a consistency student has none to give)

The experiment file, the sample stage, the evaluation jobs and the report all read labels through `parse_sampler`.
"""
import re
from dataclasses import dataclass

DIFFUSION_FAMILIES = ("ddpm", "ddim")
CONSISTENCY_FAMILY = "scm"
CONSISTENCY_STEPS = (1, 2)
LABEL = re.compile(r"(?P<family>[a-z]+)(?P<steps>\d+)(?:-cfg(?P<cfg>\d+(?:\.\d+)?))?")
GRAMMAR = "ddpm<N> or ddim<N> (optionally -cfg<scale>), scm1 or scm2"


@dataclass(frozen=True)
class SamplerLabel:
    family: str
    steps: int
    cfg_scale: float = 1.0

    @property
    def name(self) -> str:
        """The sampler without its guidance (the sample stage's sampling.sampler): 'ddpm250', 'scm2'."""
        return f"{self.family}{self.steps}"

    @property
    def consistency(self) -> bool:
        """Whether it samples a consistency student (a distill checkpoint) rather than a diffusion model."""
        return self.family == CONSISTENCY_FAMILY


def parse_sampler(label) -> SamplerLabel:
    """'ddpm250-cfg3' -> SamplerLabel('ddpm', 250, 3.0); 'scm2' -> SamplerLabel('scm', 2); ValueError otherwise."""
    m = LABEL.fullmatch(str(label))
    if m is None or m["family"] not in (*DIFFUSION_FAMILIES, CONSISTENCY_FAMILY) or int(m["steps"]) < 1:
        raise ValueError(f"sampler {label!r} is not {GRAMMAR}")
    parsed = SamplerLabel(m["family"], int(m["steps"]), float(m["cfg"] or 1.0))
    if parsed.consistency and (parsed.steps not in CONSISTENCY_STEPS or m["cfg"] is not None):
        raise ValueError(f"sampler {label!r}: a consistency sampler is scm1 or scm2, without guidance")
    return parsed
