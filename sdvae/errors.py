"""Exceptions the command line turns into a message and an exit code (one line, never a traceback)."""


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM: the run stopped after a whole step and wrote its checkpoint. exit_code: 128 + signal."""

    def __init__(self, message: str, exit_code: int, announce: bool = True):
        super().__init__(message)
        self.exit_code, self.announce = exit_code, announce  # announce: the main process says it, once
