"""How long a user waits for ``fit`` to refuse a bad recipe, against the cost of importing torch
(the floor of any command of the package) and of importing Lightning (what training needs, and a
refusal does not), each a fresh interpreter, timed in the same run.

    python benchmarks/startup.py [--rounds 5] [--json PATH]

Every bad key or value is refused before anything trains; this measures how soon. Rounds
alternate between the commands so that a change in the machine's load touches all alike; medians
are reported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slr_zoo.files import write_json

TYPO = """name: typo
task: {name: iterate, n_train: 64, n_val: 8, hops: [1, 3]}
backbone: {name: gpt2, hidden_size: 32, heads: 2, prelude_layers: 1, core_layers: 1, coda_layers: 0}
loop: {max_stepz: 2}
"""


def seconds(command: list[str], expect: int) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != expect:
        raise SystemExit(f"startup: {' '.join(command)} exited {done.returncode}, expected {expect}:\n{done.stderr[-2000:]}")
    return took


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "typo.yaml"
        recipe.write_text(TYPO)
        commands = {
            "import torch": ([sys.executable, "-c", "import torch"], 0),
            "import lightning": ([sys.executable, "-c", "import lightning"], 0),
            "fit refuses a typo": ([sys.executable, "-m", "slr_zoo.fit", str(recipe), f"output_dir={tmp}"], 2),
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, (command, expect) in commands.items():
                times[name].append(seconds(command, expect))
    median = {name: statistics.median(values) for name, values in times.items()}
    floor = median["import torch"]
    print(f"median of {args.rounds} rounds, a fresh interpreter each")
    print("| command | seconds | ratio to import torch |")
    print("|---|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.2f} | {value / floor:.2f} |")
    if args.json:
        write_json(args.json, {"rounds": args.rounds, "seconds": median,
                               "ratio_to_import_torch": {name: value / floor for name, value in median.items()}})


if __name__ == "__main__":
    main()
