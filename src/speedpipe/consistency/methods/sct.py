"""sCT: continuous-time consistency training. The student follows the data's velocity instead of a teacher's:
dx_t/dt = cos t·z − sin t·x0 for the pair (x0, z) that made x_t, a one-sample (unbiased, noisy) estimate of the
probability-flow ODE of the data; no teacher network is evaluated (and no guidance applies)."""
from speedpipe.consistency.methods import ConsistencyMethod
from speedpipe.consistency.objectives import ConsistencyLoss, data_velocity


def pair_velocity(x0, z, x_t, t, y, sigma_d):
    return data_velocity(x0, z, t)


class SCTLoss(ConsistencyLoss):
    def __init__(self, tangent_warmup: int, tangent_c: float = 0.1, precision: str = "fp32"):
        super().__init__(pair_velocity, tangent_warmup, tangent_c, precision)


METHOD = ConsistencyMethod(
    name="sct", title="sCT", follows="the data's velocity cos t·z − sin t·x0 of the pair that made x_t",
    teacher_velocity=False,
    objective=lambda teacher, d: SCTLoss(d.tangent_warmup, d.tangent_c, d.precision))
