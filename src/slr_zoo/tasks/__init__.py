from slr_zoo.tasks.base import TASKS, Record, Task, check_record
from slr_zoo.tasks import iterate, json_file, multiplication, prontoqa, prosqa, walk  # noqa: F401  (registers members)

__all__ = ["TASKS", "Record", "Task", "check_record"]
