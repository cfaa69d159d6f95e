"""GradMonitor: says why NaNs appear (exploding gradients, vanishing gradients, bad input data).

recorder: the monitor and its hooks (recording, no host sync); reader, readback: reading back;
rings: its buffers on the device; flight: the flight recorder and dump; files: writing them whole
or not at all; watch: what the hooks watch; history: thresholds, history and findings; diagnose,
bad_input, feature_rules: the rules; report: the text; plot: the picture (matplotlib imported only
there, only when drawing).
"""

from gradstats.monitor.history import CAUSES, Finding, MonitorHistory, MonitorThresholds
from gradstats.monitor.recorder import GradMonitor

__all__ = ["CAUSES", "Finding", "GradMonitor", "MonitorHistory", "MonitorThresholds"]
