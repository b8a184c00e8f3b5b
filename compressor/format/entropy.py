"""Entropy coding of quantization codes: the paper's Huffman code over a pooled histogram, and
rANS (through the ``constriction`` library) for sizes at the entropy bound.

Both run without any Python loop per symbol. The Huffman stream is cut into chunks of a fixed
number of symbols whose bit lengths are stored, so that decoding advances every chunk in
lockstep, several symbols per step through a 16-bit lookup table; encoding writes all codes at
once into 64-bit words.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

HUFFMAN_MAX_LENGTH = 16  # decode reads 16-bit windows
HUFFMAN_CHUNK = 4096  # symbols per chunk: one uint32 bit length each (0.008 bits per symbol)
_MAX_CHUNK = 1 << 16
_BLOCK = 1 << 22  # symbols encoded per pass, to bound temporary memory
_EXPAND_CELLS = 1 << 18  # Huffman decode: (chunk, step) records expanded per pass

# rANS (constriction's default AnsCoder): 32-bit words, a 64-bit state, probabilities quantized
# to 24 bits.
ANS_PRECISION = 24
# The most weights an rANS stream may claim per stored bit (at least a quarter bit a weight),
# beyond a few that any stream may hold. A writer whose stream would claim more falls back to
# Huffman (at least one bit a weight), so every file it writes passes the loader's check.
ANS_MAX_SYMBOLS_PER_BIT = 4
ANS_FREE_SYMBOLS = 1 << 12
_ANS_BLOCK = 1 << 18  # symbols decoded per call into constriction (1 MB of int32)


class CodingError(ValueError):
    """Encoded data that does not decode (raised on corrupt input)."""


def entropy_bits(counts: np.ndarray) -> float:
    """Empirical entropy, in bits per symbol, of a histogram."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def mean_code_length(counts: np.ndarray, lengths: np.ndarray) -> float:
    """Mean bits per symbol of a code with ``lengths`` over the histogram ``counts``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return float((counts * np.asarray(lengths)).sum() / total) if total else 0.0


# --------------------------------------------------------------------------------------------
# Huffman code construction.


def _huffman_lengths_unbounded(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths (one loop step per merge of two of the at most 256 symbols)."""
    symbols = [int(s) for s in np.flatnonzero(counts)]
    lengths = np.zeros(counts.size, dtype=np.int64)
    if len(symbols) == 1:
        lengths[symbols[0]] = 1
        return lengths
    heap = [(int(counts[s]), s, (s,)) for s in symbols]
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, t1, s1 = heapq.heappop(heap)
        c2, t2, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
    return lengths


def huffman_lengths(counts: np.ndarray, max_length: int = HUFFMAN_MAX_LENGTH) -> np.ndarray:
    """Code length of each symbol (0 for absent ones), at most ``max_length`` bits. Rare
    symbols are made less rare until the tree is shallow enough, which costs next to nothing
    in mean length and bounds the decode table."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() == 0:
        return np.zeros(counts.size, dtype=np.int64)
    present = counts > 0
    floor = 0
    while True:
        lengths = _huffman_lengths_unbounded(np.where(present, np.maximum(counts, floor), 0))
        if lengths.max() <= max_length:
            return lengths
        floor = max(1, floor * 2, int(counts.sum() >> max_length))


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman code values for the given lengths (shorter codes first)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        code += 1
        previous = int(lengths[symbol])
    return codes


def check_lengths(lengths: np.ndarray, alphabet: int) -> np.ndarray:
    """Validate untrusted code lengths (a prefix code over ``alphabet`` symbols)."""
    lengths = np.asarray(lengths)
    if lengths.shape != (alphabet,) or lengths.dtype.kind not in "iu":
        raise CodingError(f"Huffman table must hold {alphabet} integer lengths")
    lengths = lengths.astype(np.int64)
    if lengths.min(initial=0) < 0 or lengths.max(initial=0) > HUFFMAN_MAX_LENGTH:
        raise CodingError(f"Huffman code lengths must be 0..{HUFFMAN_MAX_LENGTH}")
    used = lengths[lengths > 0]
    if not used.size:
        raise CodingError("Huffman table codes no symbol")
    if int(np.sum(1 << (HUFFMAN_MAX_LENGTH - used))) > 1 << HUFFMAN_MAX_LENGTH:
        raise CodingError("Huffman code lengths do not form a prefix code")
    return lengths


# --------------------------------------------------------------------------------------------
# Huffman encoding.


def _chunk_bits(symbol_lengths: np.ndarray, chunk: int) -> np.ndarray:
    return np.add.reduceat(symbol_lengths, np.arange(0, symbol_lengths.size, chunk), dtype=np.int64)


def huffman_encode(
    symbols: np.ndarray, lengths: np.ndarray, chunk: int = HUFFMAN_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``symbols`` as one MSB-first bit stream (uint8), plus the bit length of every
    chunk of ``chunk`` symbols (uint32)."""
    symbols = np.ascontiguousarray(symbols, dtype=np.uint8).ravel()
    lengths = np.asarray(lengths, dtype=np.int64)
    if not 1 <= chunk <= _MAX_CHUNK:
        raise ValueError(f"chunk must be from 1 to {_MAX_CHUNK}, got {chunk}")
    if symbols.size == 0:
        return np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.uint32)
    if symbols.max() >= lengths.size or lengths[np.unique(symbols)].min() == 0:
        raise CodingError("a symbol has no Huffman code (absent from the histogram)")
    table_length = lengths.astype(np.uint8)
    table_code = canonical_codes(lengths).astype(np.uint64)
    block = _BLOCK - _BLOCK % chunk if chunk <= _BLOCK else chunk
    chunk_bits = np.concatenate(
        [
            _chunk_bits(table_length[symbols[i : i + block]], chunk)
            for i in range(0, symbols.size, block)
        ]
    )
    total = int(chunk_bits.sum())
    words = np.zeros(total // 64 + 2, dtype=np.uint64)
    start_bit = 0
    for i in range(0, symbols.size, block):
        part = symbols[i : i + block]
        length = table_length[part].astype(np.int64)
        code = table_code[part]
        ends = np.cumsum(length) + start_bit
        starts = ends - length
        start_bit = int(ends[-1])
        word = starts >> 6
        shift = 64 - (starts & 63) - length  # negative: the code spills into the next word
        spill = shift < 0
        contribution = np.where(
            spill,
            code >> np.clip(-shift, 0, 63).astype(np.uint64),
            code << np.clip(shift, 0, 63).astype(np.uint64),
        )
        first = np.flatnonzero(np.diff(word)) + 1
        first = np.concatenate([[0], first])
        words[word[first]] |= np.bitwise_or.reduceat(contribution, first)
        spilled = word[spill] + 1  # at most one code crosses each word boundary: unique
        words[spilled] |= code[spill] << (64 + shift[spill]).astype(np.uint64)
    stream = words.astype(">u8").view(np.uint8)[: (total + 7) // 8].copy()
    return stream, chunk_bits.astype(np.uint32)


# --------------------------------------------------------------------------------------------
# Huffman decoding.


def _decode_tables(lengths: np.ndarray, per_step: int) -> tuple[np.ndarray, ...]:
    """For every 16-bit window: how many whole codes it starts with (up to ``per_step``),
    their symbols, and the bits taken by its first 0..per_step codes."""
    codes = canonical_codes(lengths)
    first_symbol = np.zeros(1 << HUFFMAN_MAX_LENGTH, dtype=np.uint8)
    first_length = np.zeros(1 << HUFFMAN_MAX_LENGTH, dtype=np.int64)
    for symbol in np.flatnonzero(lengths):  # one slice per symbol of the alphabet
        shift = HUFFMAN_MAX_LENGTH - int(lengths[symbol])
        begin = int(codes[symbol]) << shift
        first_symbol[begin : begin + (1 << shift)] = symbol
        first_length[begin : begin + (1 << shift)] = lengths[symbol]
    window = np.arange(1 << HUFFMAN_MAX_LENGTH, dtype=np.int64)
    prefix_bits = np.zeros((per_step + 1, window.size), dtype=np.int64)
    count = np.zeros_like(window)
    alive = np.ones(window.size, dtype=bool)
    symbols = np.zeros((per_step, window.size), dtype=np.uint8)
    for j in range(per_step):
        used = prefix_bits[j]
        rest = (window << used) & 0xFFFF
        length = first_length[rest]
        ok = alive & (length > 0) & (used + length <= HUFFMAN_MAX_LENGTH)
        symbols[j] = np.where(ok, first_symbol[rest], 0)
        prefix_bits[j + 1] = used + np.where(ok, length, 0)
        count += ok
        alive = ok
    return count, prefix_bits, symbols


def huffman_decode(
    stream: np.ndarray,
    chunk_bits: np.ndarray,
    lengths: np.ndarray,
    count: int,
    chunk: int = HUFFMAN_CHUNK,
) -> np.ndarray:
    """Inverse of :func:`huffman_encode`. ``lengths`` must have passed :func:`check_lengths`;
    every size is checked against the data before anything in proportion to ``count`` is
    allocated.

    All chunks advance in lockstep; each step only records the 16-bit window at every chunk's
    position (a contiguous row) and moves past the whole codes it starts with. The symbols
    are expanded from the recorded windows afterwards, in a few passes over large arrays.
    """
    stream = np.ascontiguousarray(stream, dtype=np.uint8).ravel()
    lengths = np.asarray(lengths, dtype=np.int64)
    if not 1 <= chunk <= _MAX_CHUNK:
        raise CodingError(f"chunk size {chunk} outside 1..{_MAX_CHUNK}")
    if count < 0:
        raise CodingError(f"negative symbol count {count}")
    chunks = -(-count // chunk)
    chunk_bits = np.asarray(chunk_bits)
    if chunk_bits.shape != (chunks,):
        raise CodingError(f"{chunk_bits.size} chunk lengths for {count} symbols, need {chunks}")
    chunk_bits = chunk_bits.astype(np.int64)
    total = int(chunk_bits.sum())
    if (total + 7) // 8 != stream.size:
        raise CodingError(f"Huffman stream of {stream.size} bytes, chunk lengths say {total} bits")
    if count == 0:
        return np.zeros(0, dtype=np.uint8)
    target = np.full(chunks, chunk, dtype=np.int64)
    target[-1] = count - (chunks - 1) * chunk
    shortest = int(lengths[lengths > 0].min())
    if (chunk_bits < target * shortest).any() or (chunk_bits > target * HUFFMAN_MAX_LENGTH).any():
        raise CodingError("a Huffman chunk length does not fit its number of symbols")

    used = lengths > 0
    mean = float(np.sum(lengths[used] * np.exp2(-lengths[used].astype(np.float64))))
    per_step = int(np.clip(HUFFMAN_MAX_LENGTH // max(1, round(mean)), 1, 8))
    table_count, prefix_bits, table_symbols = _decode_tables(lengths, per_step)
    step_bits = prefix_bits[per_step]
    # 24 bits starting at every byte. Chunks that are done keep reading (at most 16 bits per
    # step for at most ``chunk`` steps) into the zero padding.
    padded = np.zeros(stream.size + 2 * chunk + 4, dtype=np.int32)
    padded[: stream.size] = stream
    window24 = (padded[:-2] << 16) | (padded[1:-1] << 8) | padded[2:]
    del padded
    position = np.concatenate([[0], np.cumsum(chunk_bits)[:-1]])
    decoded = np.zeros(chunks, dtype=np.int64)
    windows = np.empty((chunk, chunks), dtype=np.uint16)  # untouched rows cost no memory
    steps = 0
    while steps < chunk:
        window = (window24[position >> 3] >> (8 - (position & 7))) & 0xFFFF
        windows[steps] = window
        steps += 1
        advance = step_bits[window]
        if not advance.any():  # every chunk stuck on an invalid code: it stays stuck
            raise CodingError("invalid Huffman code in the stream")
        position += advance
        decoded += table_count[window]
        if steps % 16 == 0 and (decoded >= target).all():
            break
    del window24, position
    # Expand the records a block of chunks at a time: the temporaries (several int64 per
    # record) stay bounded whatever the number of symbols.
    out = np.empty(count, dtype=np.uint8)
    rows = max(1, _EXPAND_CELLS // steps)
    start = 0
    for first in range(0, chunks, rows):
        part = windows[:steps, first : first + rows].T  # (rows, steps)
        want = target[first : first + rows]
        got = table_count[part]
        before = np.cumsum(got, axis=1) - got
        take = np.clip(want[:, None] - before, 0, got)  # codes of each record inside the chunk
        if not np.array_equal(take.sum(axis=1), want):
            raise CodingError("invalid Huffman code in the stream")
        spent = prefix_bits[take, part].sum(axis=1)
        if not np.array_equal(spent, chunk_bits[first : first + rows]):
            raise CodingError("Huffman chunks do not end where their lengths say")
        keep = np.arange(per_step)[None, None, :] < take[:, :, None]
        symbols = np.moveaxis(table_symbols[:, part], 0, -1)[keep]
        out[start : start + symbols.size] = symbols
        start += symbols.size
    return out


# --------------------------------------------------------------------------------------------
# rANS through constriction.


def ans_available() -> bool:
    """Whether the optional ``constriction`` package (rANS coder) is installed."""
    try:
        import constriction  # noqa: F401
    except ImportError:
        return False
    return True


def _ans_probabilities(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.size == 1:  # constriction needs two entries; the second is never coded
        counts = np.append(counts, 0.0)
    return (counts / counts.sum()).astype(np.float32)


def _ans_model(counts: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(_ans_probabilities(counts), perfect=False)


def ans_min_bits(counts: np.ndarray) -> float:
    """A lower bound on the bits that decoding any one symbol takes from an rANS stream
    under the histogram ``counts`` (while the stream lasts).

    constriction quantizes the probabilities to ``M = 2**24`` (its "fast" leaky quantizer:
    every symbol gets 1, the rest ``M - n`` is shared out by floor of the scaled cumulative
    sum), so the most probable symbol gets at most ``p_max * M + 4n + 8`` (slack for the
    floors and float32 rounding) and at most ``M - (n - 1)``. Decoding a symbol of frequency
    ``f`` maps the state ``x`` (at least ``2**32`` while the stream has words left) to at most
    ``x * f / M + (M - f)``, so it takes at least ``-log2(f/M + (M - f) / 2**32)`` bits."""
    probabilities = _ans_probabilities(counts).astype(np.float64)
    n = probabilities.size
    total = 1 << ANS_PRECISION
    f_max = min(total - (n - 1), math.floor(float(probabilities.max()) * total) + 4 * n + 8)
    return -math.log2(f_max / total + (total - f_max) / 2**32)


def ans_max_symbols(counts: np.ndarray, words: int) -> int:
    """The most symbols the loader believes an rANS stream of ``words`` 32-bit words holds.

    Two bounds, the smaller wins: what the bits can carry at :func:`ans_min_bits` each (the
    64-bit state counted as two more words), and :data:`ANS_MAX_SYMBOLS_PER_BIT` per stored
    bit; plus :data:`ANS_FREE_SYMBOLS`. rANS has no hard limit of its own: constriction's
    state starts at 0, and while it stays below the first symbol's frequency that symbol
    costs nothing, so a stream can end in an arbitrarily long run of it. The writer
    therefore checks its own streams against this bound (:func:`ans_fits`) and uses Huffman
    where one would not pass; decoding allocates nothing before the check."""
    by_bits = math.floor((32 * words + 64) / ans_min_bits(counts))
    return ANS_FREE_SYMBOLS + min(by_bits, ANS_MAX_SYMBOLS_PER_BIT * 32 * words)


def ans_fits(count: int, counts: np.ndarray, words: int) -> bool:
    """Whether ``words`` words may hold ``count`` symbols (:func:`ans_max_symbols`)."""
    return count <= ans_max_symbols(counts, words)


def ans_encode(symbols: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """rANS-encode ``symbols`` under the histogram ``counts``; returns uint32 words."""
    import constriction

    symbols = np.asarray(symbols, dtype=np.int32).ravel()
    coder = constriction.stream.stack.AnsCoder()
    if symbols.size:
        coder.encode_reverse(symbols, _ans_model(counts))
    return coder.get_compressed().astype(np.uint32)


def ans_decode(words: np.ndarray, counts: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`ans_encode`. ``count`` is checked against what the stream can hold
    (:func:`ans_max_symbols`) before anything in proportion to it is allocated, and the
    symbols are decoded a block at a time into one byte each."""
    import constriction

    words = np.ascontiguousarray(words, dtype=np.uint32).ravel()
    if count == 0:
        if words.size:
            raise CodingError("rANS stream holds data but no symbol")
        return np.zeros(0, dtype=np.uint8)
    if not ans_fits(count, counts, words.size):
        raise CodingError(
            f"{count} symbols claimed from {words.size} words; at most "
            f"{ans_max_symbols(counts, words.size)} fit"
        )
    coder = constriction.stream.stack.AnsCoder(words)
    model = _ans_model(counts)
    out = np.empty(count, dtype=np.uint8)
    try:
        for start in range(0, count, _ANS_BLOCK):
            size = min(_ANS_BLOCK, count - start)
            out[start : start + size] = coder.decode(model, size)
    except BaseException as exc:  # the Rust extension reports corrupt input its own way
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise CodingError(f"rANS stream does not decode ({exc})") from None
    if not coder.is_empty():
        raise CodingError("rANS stream has data left after the last symbol")
    return out
