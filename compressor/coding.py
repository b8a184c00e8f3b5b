"""Storing quantization codes compactly: fixed-width bit-packing, the paper's Huffman code
over a pooled histogram, and rANS (through the ``constriction`` library) for sizes at the
entropy bound. Everything is vectorised with numpy; no loop runs per symbol."""

from __future__ import annotations

import heapq

import numpy as np

HUFFMAN_MAX_LENGTH = 16  # decode reads 16-bit windows through a 65,536-entry table
HUFFMAN_CHUNK = 8192  # symbols per independently decodable chunk (one uint32 length each)


class CodingError(ValueError):
    """Encoded data that does not decode (raised on corrupt input)."""


# --------------------------------------------------------------------------------------------
# Fixed-width bit-packing.


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (uint8, each < 2**bits) as a dense little stream of ``bits``-bit fields."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8).ravel()
    if bits == 8:
        return codes.copy()
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded = np.zeros(-(-codes.size // per_byte) * per_byte, dtype=np.uint8)
        padded[: codes.size] = codes
        groups = padded.reshape(-1, per_byte)
        out = np.zeros(groups.shape[0], dtype=np.uint8)
        for i in range(per_byte):
            out |= groups[:, i] << np.uint8(i * bits)
        return out
    planes = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.ravel(), bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`."""
    data = np.ascontiguousarray(data, dtype=np.uint8).ravel()
    if data.size != packed_nbytes(count, bits):
        raise CodingError(
            f"{data.size} bytes of {bits}-bit codes, expected {packed_nbytes(count, bits)} "
            f"for {count} values"
        )
    if bits == 8:
        return data.copy()
    if 8 % bits == 0:
        per_byte = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        out = np.empty((data.size, per_byte), dtype=np.uint8)
        for i in range(per_byte):
            out[:, i] = (data >> np.uint8(i * bits)) & mask
        return out.ravel()[:count]
    planes = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits)
    return np.packbits(planes, axis=1, bitorder="little").ravel()


# --------------------------------------------------------------------------------------------
# Huffman.


def entropy_bits(counts: np.ndarray) -> float:
    """Empirical entropy in bits per symbol of a histogram."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def _huffman_lengths_unbounded(counts: np.ndarray) -> np.ndarray:
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
    codes = np.zeros(lengths.size, dtype=np.int64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        code += 1
        previous = int(lengths[symbol])
    return codes


def _check_lengths(lengths: np.ndarray) -> None:
    if lengths.min(initial=0) < 0 or lengths.max(initial=0) > HUFFMAN_MAX_LENGTH:
        raise CodingError(f"Huffman code lengths must be 0..{HUFFMAN_MAX_LENGTH}")
    used = lengths[lengths > 0]
    if used.size and float(np.sum(np.exp2(-used.astype(np.float64)))) > 1.0 + 1e-12:
        raise CodingError("Huffman code lengths do not form a prefix code")


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``symbols`` as a bit stream (uint8) plus the bit length of every chunk of
    :data:`HUFFMAN_CHUNK` symbols (uint32), so that chunks decode side by side."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    codes = canonical_codes(lengths)
    sym_len = lengths[symbols]
    if symbols.size and sym_len.min() == 0:
        raise CodingError("a symbol has no Huffman code (absent from the histogram)")
    ends = np.cumsum(sym_len)
    total = int(ends[-1]) if ends.size else 0
    starts = ends - sym_len
    stream = np.zeros(total, dtype=np.uint8)
    sym_code = codes[symbols]
    for j in range(int(sym_len.max(initial=0))):
        has = sym_len > j
        stream[starts[has] + j] = (sym_code[has] >> (sym_len[has] - 1 - j)) & 1
    chunk_ends = ends[HUFFMAN_CHUNK - 1 :: HUFFMAN_CHUNK]
    chunk_bits = np.diff(np.concatenate([[0], chunk_ends, [total]] if ends.size else [[0]]))
    if symbols.size and symbols.size % HUFFMAN_CHUNK == 0:
        chunk_bits = chunk_bits[:-1]
    return np.packbits(stream), chunk_bits.astype(np.uint32)


def _decode_table(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes = canonical_codes(lengths)
    table_symbol = np.zeros(1 << HUFFMAN_MAX_LENGTH, dtype=np.int64)
    table_length = np.zeros(1 << HUFFMAN_MAX_LENGTH, dtype=np.int64)
    for symbol in np.flatnonzero(lengths):
        shift = HUFFMAN_MAX_LENGTH - int(lengths[symbol])
        first = int(codes[symbol]) << shift
        table_symbol[first : first + (1 << shift)] = symbol
        table_length[first : first + (1 << shift)] = lengths[symbol]
    return table_symbol, table_length


def huffman_decode(
    data: np.ndarray, chunk_bits: np.ndarray, lengths: np.ndarray, count: int
) -> np.ndarray:
    """Inverse of :func:`huffman_encode`: all chunks advance in lockstep, one symbol each per
    vectorised step, through a 16-bit lookup table."""
    _check_lengths(lengths)
    chunks = -(-count // HUFFMAN_CHUNK)
    chunk_bits = np.asarray(chunk_bits, dtype=np.int64)
    if chunk_bits.size != chunks:
        raise CodingError(f"{chunk_bits.size} chunk lengths for {count} symbols, need {chunks}")
    total = int(chunk_bits.sum())
    if (total + 7) // 8 != data.size:
        raise CodingError(f"Huffman stream of {data.size} bytes, chunk lengths say {total} bits")
    if count == 0:
        return np.zeros(0, dtype=np.uint8)
    table_symbol, table_length = _decode_table(lengths)
    padded = np.concatenate([np.asarray(data, dtype=np.uint8), np.zeros(3, dtype=np.uint8)])
    padded = padded.astype(np.int64)
    position = np.concatenate([[0], np.cumsum(chunk_bits)[:-1]])
    end = position + chunk_bits
    out = np.zeros((chunks, HUFFMAN_CHUNK), dtype=np.uint8)
    last = count - (chunks - 1) * HUFFMAN_CHUNK
    for step in range(HUFFMAN_CHUNK if chunks > 1 else last):
        active = slice(None) if step < last else slice(0, chunks - 1)
        pos = position[active]
        byte = pos >> 3
        window = (padded[byte] << 16) | (padded[byte + 1] << 8) | padded[byte + 2]
        window = (window >> (8 - (pos & 7))) & 0xFFFF
        length = table_length[window]
        if not length.all():
            raise CodingError("invalid Huffman code in the stream")
        out[active, step] = table_symbol[window]
        position[active] = pos + length
    if not np.array_equal(position, end):
        raise CodingError("Huffman chunks do not end where their lengths say")
    return out.ravel()[:count]


# --------------------------------------------------------------------------------------------
# rANS through constriction.


def ans_available() -> bool:
    try:
        import constriction  # noqa: F401
    except ImportError:
        return False
    return True


def _ans_model(counts: np.ndarray):  # noqa: ANN202
    import constriction

    counts = np.asarray(counts, dtype=np.float64)
    probabilities = (counts / counts.sum()).astype(np.float32)
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def ans_encode(symbols: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """rANS-encode ``symbols`` under the histogram ``counts``; returns uint32 words."""
    import constriction

    symbols = np.asarray(symbols, dtype=np.int32).ravel()
    coder = constriction.stream.stack.AnsCoder()
    if symbols.size:
        coder.encode_reverse(symbols, _ans_model(counts))
    return coder.get_compressed().astype(np.uint32)


def ans_decode(words: np.ndarray, counts: np.ndarray, count: int) -> np.ndarray:
    import constriction

    if count == 0:
        return np.zeros(0, dtype=np.uint8)
    coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
    try:
        symbols = coder.decode(_ans_model(counts), count)
    except BaseException as exc:  # the Rust extension reports corrupt input its own way
        raise CodingError(f"rANS stream does not decode ({exc})") from None
    if not coder.is_empty():
        raise CodingError("rANS stream has data left after the last symbol")
    return np.asarray(symbols, dtype=np.uint8)
