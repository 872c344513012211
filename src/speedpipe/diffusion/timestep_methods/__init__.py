"""Timestep samplers and loss weightings of one's own: one module here each (the built-in ones are in
speedpipe.diffusion.timesteps), registering them by name in a dict `SAMPLERS = {"name": SamplerClass}` (a subclass
of timesteps.TimestepSampler) or `WEIGHTINGS = {"name": weights_function}`. A method's parameters are the keyword
arguments after `diffusion` of its class's __init__ or its function, annotated float, int, bool or str: they become the
keys of the config's diffusion.timestep_sampler / diffusion.loss_weighting section (speedpipe.declared)
and nothing else needs an edit: `"diffusion.timestep_sampler={name: mine, power: 2.0}"` in a method's overrides."""
