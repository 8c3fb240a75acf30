"""Everything about a run folder (`fusion-distill train --output-dir RUN`), in one package:

    layout.py         what a run folder holds, which checkpoints exist, verify and ship (the names below)
    lock.py           one writer per folder: the lock train, cache-targets, export, fit-teacher, evaluate take
    staged_export.py  exports written aside and renamed into place, whole or not at all
    log_trim.py       a resumed run drops the log lines past its checkpoint

The layout's names are exported here (`from distill.runs import find_checkpoint`); the other
three are imported from their modules. staged_export pulls in the student package (torch), so
it is not imported here: `fusion-distill --help` stays fast.
"""

from .layout import *  # noqa: F401,F403
from .layout import __all__  # noqa: F401
