"""iMF's loss (improved MeanFlow, Geng et al., 2025): MeanFlow's student regressed through its compound velocity
u + (t − r)·sg(du/dt) on e − x, the derivative along the student's own velocity u(z_t, t, t). Only the loss: the
published iMF also conditions the network on the guidance scale and interval. Settings: distill.meanflow."""
from speedpipe.consistency.methods.meanflow import objective, with_meanflow_student

METHOD = with_meanflow_student(
    "imf", "iMF's loss", "the average velocity of the linear path, its compound velocity regressed on e − x",
    lambda teacher, d: objective(teacher, d, imf=True))
