"""failures.guarded: what a run says when a DataLoader worker cannot go on (real worker processes)."""

import pytest
import torch

from rectrain.data.failures import DecodeFailures, guarded
from rectrain.data.shard_cache import ShardFetchError
from rectrain.data.transforms import DecodeError
from rectrain.errors import UserError


class Failing(torch.utils.data.Dataset):
    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            raise self.error
        return torch.zeros(2), i, []


def _drain(error, workers):
    loader = torch.utils.data.DataLoader(Failing(error), batch_size=1, num_workers=workers)
    return list(guarded(loader))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bucket_that_cannot_be_decoded_is_one_line_without_the_workers_traceback(workers):
    error = DecodeError("3 images of one bucket failed to decode in a row, e.g. cannot decode a/b.jpg: truncated")
    with pytest.raises(DecodeFailures) as e:
        _drain(error, workers)
    assert str(e.value).startswith("3 images of one bucket failed to decode in a row, e.g. cannot decode a/b.jpg: "
                                   "truncated. The storage may be failing")
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value) and "raise" not in str(e.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_remote_shard_that_cannot_be_fetched_stops_the_run_with_how_to_continue(workers):
    error = ShardFetchError("cannot fetch shard https://x.example/train-0004.tar (HTTP 404 Not Found; 1 attempt(s)); "
                            "check the URL and the network, then rerun (nothing was left in the cache)")
    with pytest.raises(UserError) as e:
        _drain(error, workers)
    assert not isinstance(e.value, DecodeFailures)
    assert str(e.value).startswith("cannot fetch shard https://x.example/train-0004.tar (HTTP 404 Not Found;")
    assert str(e.value).endswith("continue it with --resume auto (the last checkpoint is intact)")
    assert "\n" not in str(e.value)
