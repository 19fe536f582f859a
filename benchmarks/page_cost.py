"""What report.html and methods.md cost: writes both for a run folder 10 times and prints the median seconds
(the page is refreshed after every epoch, so it must stay well under a second).

    python benchmarks/page_cost.py runs/exp1
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import report  # noqa: E402


def median_seconds(write, folder, repeats=10):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        write(folder)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main():
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/exp1")
    page, methods = median_seconds(report.write_page, folder), median_seconds(report.write_methods, folder)
    size = (folder / "report.html").stat().st_size / 1e6
    print(f"{folder}: report.html {page:.3f} s ({size:.1f} MB, pictures embedded), methods.md {methods:.3f} s")


if __name__ == "__main__":
    main()
