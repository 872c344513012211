"""SpeeD-compatible entry point: python main.py -c CONFIG -p train|inference|sample [a.b=c ...].

Works as a single process or under `torchrun --nproc_per_node=N main.py ...`.
"""
from speedpipe.cli import main_py

if __name__ == "__main__":
    main_py()
