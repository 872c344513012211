"""The report stage's parts (speedpipe.stages.report): its tables, its figures and the experiment's README."""
