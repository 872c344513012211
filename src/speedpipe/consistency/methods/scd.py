"""sCD: continuous-time consistency distillation. The student follows the teacher's probability-flow ODE,
dx_t/dt = σ_d·F_teacher(x_t/σ_d, t) (with the teacher's classifier-free guidance, distill.cfg_scale)."""
from speedpipe.consistency.methods import ConsistencyMethod
from speedpipe.consistency.objectives import ConsistencyLoss


class TeacherVelocity:
    """dx_t/dt = σ_d·F_teacher(x_t/σ_d, t, y), the network in fp32, the result in fp64."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, x0, z, x_t, t, y, sigma_d):
        return sigma_d * self.teacher(x_t.float() / sigma_d, t.float(), y).double()


class SCDLoss(ConsistencyLoss):
    def __init__(self, teacher, tangent_warmup: int, tangent_c: float = 0.1, precision: str = "fp32"):
        super().__init__(TeacherVelocity(teacher), tangent_warmup, tangent_c, precision)


METHOD = ConsistencyMethod(
    name="scd", title="sCD", follows="the teacher's velocity (its probability-flow ODE)",
    teacher_velocity=True,
    objective=lambda teacher, d: SCDLoss(teacher, d.tangent_warmup, d.tangent_c, d.precision))
