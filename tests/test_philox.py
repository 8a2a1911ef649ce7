"""Philox4x32-10 (flora.philox): the Random123 known answers, a pure-Python
implementation written from the published algorithm, and the stream helpers."""

import pytest
import torch
from reference import philox_python

from flora.philox import philox4x32, philox4x32_streams, random_words, stream_words

MASK = 0xFFFFFFFF
KNOWN_ANSWERS = [  # Random123 kat_vectors: philox4x32 10, counter, key, expected
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK,) * 4, (MASK,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KNOWN_ANSWERS)
def test_philox_known_answers(ctr, key, expected):
    assert tuple(philox_python(ctr, key)) == expected
    words = philox4x32(torch.tensor([ctr[0]]), ctr[1], ctr[2], ctr[3], *key)
    assert tuple(int(w) for w in words[:, 0]) == expected


def test_philox_tensor_equals_pure_python():
    g = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (300,), generator=g, dtype=torch.int64)
    for ints in ([0, 0, 0, 0, 0], [MASK, 1, 2**31, 12345, MASK], [7, 8, 9, 10, 11]):
        words = philox4x32(counters, *ints)
        for i in range(0, 300, 7):
            ref = philox_python((int(counters[i]), *ints[:3]), tuple(ints[3:]))
            assert [int(w) for w in words[:, i]] == ref


def test_random_words_are_the_stream_in_counter_order_from_any_offset():
    words = stream_words("test", 1, 2)
    whole = random_words(40, words)
    ref = [w for c in range(10) for w in philox_python((c, *words[:3]), words[3:])]
    assert whole.tolist() == ref
    for offset, n in ((3, 10), (4, 1), (13, 27), (0, 0)):
        assert random_words(n, words, offset=offset).tolist() == ref[offset : offset + n]
    assert stream_words("test", 1, 2) != stream_words("test", 1, 3)


def test_streams_equal_one_stream_at_a_time():
    streams = [stream_words("test/streams", i) for i in range(4)]
    counter = torch.arange(11, dtype=torch.int64)
    words = philox4x32_streams(counter.expand(4, 11), torch.tensor(streams))
    assert words.shape == (4, 4, 11)
    for b, stream in enumerate(streams):
        assert torch.equal(words[:, b], philox4x32(counter, *stream))


def test_chunked_passes_give_the_same_words(monkeypatch):
    """On the CPU the rounds run over chunks of counters; the words do not depend on where a
    chunk ends: the default chunking equals one counter per pass (checked against the
    pure-Python Philox around the chunk boundaries) and one pass for everything."""
    import flora.philox as philox

    n = 2 * philox.CPU_CHUNK + 5
    counter = torch.arange(n, dtype=torch.int64)
    ints = (3, MASK, 5, 2**31 + 7, 11)
    chunked = philox4x32(counter, *ints)
    for i in (0, philox.CPU_CHUNK - 1, philox.CPU_CHUNK, n - 1):
        assert [int(w) for w in chunked[:, i]] == philox_python((i, *ints[:3]), ints[3:])
    streams = torch.tensor([stream_words("test/chunks", b) for b in range(3)])
    many = philox4x32_streams(counter.expand(3, n), streams)
    for size in (n, 1000):  # one pass; many short ones
        monkeypatch.setattr(philox, "CPU_CHUNK", size)
        assert torch.equal(philox4x32(counter, *ints), chunked)
        assert torch.equal(philox4x32_streams(counter.expand(3, n), streams), many)
    for b in range(3):
        assert torch.equal(many[:, b], philox4x32(counter, *streams[b].tolist()))
