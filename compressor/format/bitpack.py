"""Fixed-width bit-packing of quantization codes (1 to 8 bits each), vectorised with numpy.

Code ``i`` occupies bits ``[i*b, (i+1)*b)`` of a little-endian bit stream, so ``n`` codes take
exactly ``ceil(n*b/8)`` bytes. Widths that divide 8 pack within bytes; the others pack eight
codes into ``b`` bytes through one 64-bit word per group.
"""

from __future__ import annotations

import numpy as np

from compressor.quantization.grids import check_bits


class BitPackError(ValueError):
    """Packed data whose length does not match the number of codes it should hold."""


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take."""
    return (count * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """``codes`` (each below ``2**bits``) as a dense stream of ``bits``-bit fields (uint8)."""
    check_bits(int(bits))
    codes = np.ascontiguousarray(codes, dtype=np.uint8).ravel()
    count = codes.size
    if bits == 8:
        return codes.copy()
    if 8 % bits == 0:
        per_byte = 8 // bits
        groups = np.zeros((-(-count // per_byte), per_byte), dtype=np.uint8)
        groups.ravel()[:count] = codes
        out = groups[:, 0].copy()
        for i in range(1, per_byte):
            out |= groups[:, i] << np.uint8(i * bits)
        return out
    # Eight codes -> one 64-bit word whose low ``bits`` bytes are the packed group.
    groups = np.zeros((-(-count // 8), 8), dtype=np.uint8)
    groups.ravel()[:count] = codes
    word = groups[:, 0].astype("<u8")
    for i in range(1, 8):
        word |= groups[:, i].astype("<u8") << np.uint64(i * bits)
    packed = word.view(np.uint8).reshape(-1, 8)[:, :bits]
    return np.ascontiguousarray(packed).ravel()[: packed_nbytes(count, bits)]


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`; refuses data of the wrong length before allocating."""
    check_bits(int(bits))
    data = np.ascontiguousarray(data, dtype=np.uint8).ravel()
    if count < 0 or data.size != packed_nbytes(count, bits):
        raise BitPackError(
            f"{data.size} bytes of {bits}-bit codes, expected {packed_nbytes(max(count, 0), bits)} "
            f"for {count} values"
        )
    if bits == 8:
        return data.copy()
    mask = np.uint8((1 << bits) - 1)
    if 8 % bits == 0:
        per_byte = 8 // bits
        out = np.empty((data.size, per_byte), dtype=np.uint8)
        for i in range(per_byte):
            np.bitwise_and(data >> np.uint8(i * bits), mask, out=out[:, i])
        return out.ravel()[:count]
    groups = -(-count // 8)
    padded = np.zeros((groups, 8), dtype=np.uint8)
    flat = np.zeros(groups * bits, dtype=np.uint8)
    flat[: data.size] = data
    padded[:, :bits] = flat.reshape(groups, bits)
    word = padded.view("<u8").ravel()
    out = np.empty((groups, 8), dtype=np.uint8)
    for i in range(8):
        out[:, i] = (word >> np.uint64(i * bits)).astype(np.uint8) & mask
    return out.ravel()[:count]
