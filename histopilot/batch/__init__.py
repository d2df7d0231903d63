"""Cohorts: one task (index, analyze or extract) over many slides or reports.

:func:`run_cohort` reads a manifest, a folder or files (:mod:`.manifest`), skips what an
earlier run into the same folder finished, hands the rest to an engine (:mod:`.engines`: a
process pool here, or Ray Data on a cluster) whose workers hold the models (:mod:`.tasks`), and
records each result as it arrives (:mod:`.store`), so any run can be stopped and run again.
"""

from histopilot.batch.cohort import BatchSummary, run_cohort
from histopilot.batch.engines import ENGINES, Engine
from histopilot.batch.manifest import TASKS, Task
from histopilot.batch.tasks import BatchOptions

__all__ = ["ENGINES", "TASKS", "BatchOptions", "BatchSummary", "Engine", "Task", "run_cohort"]
