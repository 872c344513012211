"""Append-only CSV training log that stays consistent across resumes."""
import csv
from pathlib import Path

from speedpipe.io import WriteError, atomic_write_text


class CsvLog:
    """Rows keyed by `step`. Opening at resume_step drops rows logged after it (they will be logged again)."""

    def __init__(self, path, columns: list[str], resume_step: int = 0):
        self.path = Path(path)
        self.columns = columns
        kept = []
        if resume_step > 0 and self.path.exists():
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in kept]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def write(self, **row):
        new_file = not self.path.exists()
        try:
            with open(self.path, "a", newline="") as f:
                writer = csv.DictWriter(f, self.columns)
                if new_file:
                    writer.writeheader()
                writer.writerow({c: _fmt(row.get(c, "")) for c in self.columns})
        except OSError as err:
            raise WriteError(f"cannot append to {self.path}: {err}") from err


def _fmt(value):
    return f"{value:.8g}" if isinstance(value, float) else value
