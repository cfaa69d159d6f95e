"""`python -m gradstats bench|info`: the benchmark against torch.nn.utils, and the build report.

Uses only gradstats' public API (gradstats.__all__), as a user's script would.

- cli: the command line (arguments, configuration, printing the results)
- runner: the main loop (one gradient set per preset and dtype, one timed row per scenario)
- cases: the inputs and the sides each scenario times
- host: the host-overhead scenario (1-element gradients, warm caches, the planned call's budget)
- presets: the parameter shapes of real models
- timing: interleaved timing of the sides
- report: the JSON file, the markdown table and the progress line
- plot: the PNG of --plot (needs matplotlib)
- env: the machine, the versions and the build
- reads: counting (or forbidding) the copies of tensor values to the host
"""

from gradstats.bench.cli import (
    DESCRIPTION,
    EXIT_ERROR,
    EXIT_NO_PLOT,
    add_arguments,
    main,
    pick_device,
    run,
)
from gradstats.bench.env import info_lines

__all__ = [
    "DESCRIPTION",
    "EXIT_ERROR",
    "EXIT_NO_PLOT",
    "add_arguments",
    "info_lines",
    "main",
    "pick_device",
    "run",
]
