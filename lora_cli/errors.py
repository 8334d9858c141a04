"""The one exception type the CLI turns into a clean message and exit code 2."""


class UserError(Exception):
    """A problem with the user's input (config, files, model, adapter).

    The message is one paragraph that names the key, file or tensor at fault and says how to fix it.
    The CLI prints it without a traceback and exits with code 2.
    """


class ModelNotFound(UserError):
    """The model (or its tokenizer) could not be found or read by transformers: a wrong name, or no Hub access."""


class TrainingStopped(Exception):
    """A run stopped by SIGINT/SIGTERM after writing a checkpoint it can resume from.

    The CLI prints how to resume and exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, signum: int, step: int, checkpoint, finished: bool = False, main: bool = True):
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.finished = finished  # the signal came during the final save, which completed: nothing to resume
        self.main = main  # raised on the main process (the one that tells the user; several run under torchrun)


class Terminated(KeyboardInterrupt):
    """SIGTERM during a write that must not be left half done (lora-merge): raised like Ctrl-C's KeyboardInterrupt,
    so the same cleanup runs (the partial output folder is removed). The CLI exits with 143 (128 + SIGTERM)."""
