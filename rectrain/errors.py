"""Errors meant for people: a user mistake is a ``UserError``, printed by the CLI as one line."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag, unusable data).

    The message names the problem and the fix. The CLI prints it without a traceback and
    exits with status 2; anything else that escapes is our bug and keeps its traceback.
    """

    exit_code = 2


class DataMistake(UserError):
    """A mistake in the data set that a run finds in its set-up (an empty class folder, a batch larger than the
    data): like a bad flag, it leaves nothing behind (the run folder it had just created is removed)."""


class PeerTimeout(UserError):
    """A collective waited past --dist_timeout: another rank is stopped, stuck or gone. Not this rank's mistake and
    not the user's: exit status 1, so a scheduler may requeue the job; the launcher names a stopped rank."""

    exit_code = 1
