"""The decode-failure policy: images that the scan accepted but that fail to decode during a run.

Storage errors and files changed after the scan happen mid-run. ``BucketDataset`` replaces such an image in its
batch by another of the same bucket (the batch keeps its shape) and sends its path back with the batch; the main
process logs and counts it here, and past ``--max_decode_failures`` the run stops with one message. ``guarded``
turns "a whole run of images of one bucket cannot be decoded", raised in a worker, into that same message, and a
remote shard that cannot be fetched into one line saying how to continue.
"""

from __future__ import annotations

from rectrain.data.shard_cache import ShardFetchError
from rectrain.data.transforms import DecodeError
from rectrain.errors import UserError

__all__ = ["DecodeFailures", "DecodeFailurePolicy", "guarded", "stand_in_warning"]


class DecodeFailures(UserError):
    pass


class DecodeFailurePolicy:
    """Logs and counts the images that failed to decode; the list goes into checkpoints (each rank keeps its own)."""

    def __init__(self, max_failures: int, log=print):
        self.max_failures = max_failures
        self.log = log
        self.failures: list[str] = []

    def record(self, failed: list[str]) -> None:
        for f in failed:
            self.log(f"warning: could not decode {f}; replaced by another image of the same shape")
        self.failures.extend(failed)
        if len(self.failures) > self.max_failures:
            raise DecodeFailures(
                f"{len(self.failures)} images failed to decode (more than --max_decode_failures "
                f"{self.max_failures}); first: {self.failures[0]}. Check the dataset's storage or re-copy "
                "it; `rectrain scan --data_dir ...` lists unreadable files")

    def state_dict(self) -> list[str]:
        return list(self.failures)

    def load_state_dict(self, failures: list[str]) -> None:
        self.failures = list(failures)


def stand_in_warning(path: str, where: str = "") -> str:
    """The line for an image that failed to decode where nothing is counted (validation, `rectrain eval`): the
    loader scored another image of its bucket in its place."""
    return f"warning: could not decode {path}{where}; another image of its shape was scored in its place"


def guarded(loader):
    """Iterate a loader, turning 'a whole run of images cannot be decoded' and 'a remote shard cannot be fetched'
    into one clear message each."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except DecodeError as e:
            raise DecodeFailures(f"{_message(e)[:500]}. The storage may be failing or the dataset changed since it "
                                 "was scanned: check the files, then run `rectrain scan --data_dir ...`") from None
        except ShardFetchError as e:  # a remote shard stayed unreachable through its retries
            raise UserError(f"{_message(e)[:500]}; the run stopped here: once the shard can be fetched, continue it "
                            "with --resume auto (the last checkpoint is intact)") from None
        yield batch


def _message(e: Exception) -> str:
    """The exception's own message. Raised in a DataLoader worker, it arrives as "Caught X in DataLoader worker
    process N. Original Traceback ...", source lines included; its message is the last line's, after "X: "."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(f"{type(e).__name__}: ", 1)[-1]
