"""sCM (Lu & Song, 2024): trigflow.py (the TrigFlow view of DDPM teachers, the TrigFlow-native student),
objectives.py (the warm start and the consistency objective along any velocity), sampling.py (1- and 2-step
consistency sampling) and methods/ (the plug-ins: sCD, sCT). Nothing is imported here, so that the experiment file
can list the methods without importing torch."""
