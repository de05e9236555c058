"""PFAN position inputs: per-region grid blocks and overlap weights (docs/pfan.md).

PFAN (Wang et al., "Position Focused Attention Network for Image-Text Matching", IJCAI 2019)
describes each region by the grid blocks its box covers. The image is cut into a ``G x G`` grid
(``G`` = 16); each region keeps the ``T`` (15) blocks it overlaps most, and stores

    [T block indices (as floats), T overlap weights (normalised to sum 1), (COCO files) area]

so a row has ``2T`` (Flickr30K release) or ``2T + 1`` (COCO release) columns. Block
``(i_x, i_y)`` has index ``i_x * G + i_y`` (x-major). Missing blocks are padded with index
``G * G`` (a learned padding embedding) and weight 0.

Tie order. The authors chose the ``T`` blocks with ``np.argsort(overlaps)[::-1][:T]`` on the numpy
of their time, whose argsort is an introsort (median-of-3 quicksort, insertion sort below 17
items, heapsort past a depth limit). A box covering more than ``T`` whole blocks has more than
``T`` equal overlaps of ``1 / G^2``, so WHICH of them survive depends on that algorithm's tie
order: the kept set is an arbitrary-looking subset, not a spatial one. Recent numpy on AVX-512
machines dispatches argsort to a vectorised sort that orders ties differently. To rebuild the
authors' rows on any machine, :func:`classic_argsort` re-implements the classic introsort step by
step, and :func:`pfan_positions` uses it (or, for at most 17 items, where that introsort is a
plain insertion sort and therefore stable, numpy's stable sort, which gives the same order).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "POSITION_WIDTHS",
    "classic_argsort",
    "pfan_positions",
    "position_columns",
]

#: numpy's introsort sorts partitions of at most this many items + 1 (16) by insertion.
SMALL_QUICKSORT = 15

#: widths of the authors' released position rows: Flickr30K (2T) and COCO (2T + 1, with area).
POSITION_WIDTHS = (30, 31)


def _less(a: float, b: float) -> bool:
    """numpy's float ``<`` for sorting: NaN sorts after every number."""
    return a < b or (b != b and a == a)


def _heapsort(v: Sequence[float], idx: list[int], lo: int, n: int) -> None:
    """numpy's classic ``aheapsort`` of ``idx[lo : lo + n]`` by ``v`` (in place)."""

    # 1-based heap over a[1..n] = idx[lo .. lo + n - 1]
    def get(i: int) -> int:
        return idx[lo + i - 1]

    def put(i: int, x: int) -> None:
        idx[lo + i - 1] = x

    for start in range(n >> 1, 0, -1):
        tmp = get(start)
        i, j = start, start << 1
        while j <= n:
            if j < n and _less(v[get(j)], v[get(j + 1)]):
                j += 1
            if _less(v[tmp], v[get(j)]):
                put(i, get(j))
                i, j = j, j + j
            else:
                break
        put(i, tmp)
    while n > 1:
        tmp = get(n)
        put(n, get(1))
        n -= 1
        i, j = 1, 2
        while j <= n:
            if j < n and _less(v[get(j)], v[get(j + 1)]):
                j += 1
            if _less(v[tmp], v[get(j)]):
                put(i, get(j))
                i, j = j, j + j
            else:
                break
        put(i, tmp)


def classic_argsort(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices that sort ``values`` ascending, in the order of numpy's classic introsort.

    A step-by-step re-implementation of ``aquicksort`` from numpy's ``npysort/quicksort``
    (``np.argsort(x)`` with the default ``kind="quicksort"`` on float64 in every numpy before
    the SIMD dispatch): median-of-3 quicksort that pushes the larger partition on a stack,
    insertion sort for partitions of at most 17 items, heapsort once the depth limit
    ``2 floor(log2 n)`` is exhausted. Equal values (ties) come out in exactly that algorithm's
    order, which is neither stable nor reversed-stable once there are more than 17 items.

    Args:
        values: 1-D float values (any sequence; NaN sorts last, as in numpy).

    Returns:
        int64 ``[n]`` permutation.
    """
    v = [float(x) for x in np.asarray(values, dtype=np.float64).ravel()]
    num = len(v)
    idx = list(range(num))
    if num < 2:
        return np.asarray(idx, dtype=np.int64)
    pl, pr = 0, num - 1
    stack: list[tuple[int, int, int]] = []  # (pl, pr, depth) of partitions still to sort
    depth = 2 * (num.bit_length() - 1)
    while True:
        if depth < 0:
            _heapsort(v, idx, pl, pr - pl + 1)
        else:
            while pr - pl > SMALL_QUICKSORT:
                pm = pl + ((pr - pl) >> 1)
                if _less(v[idx[pm]], v[idx[pl]]):
                    idx[pm], idx[pl] = idx[pl], idx[pm]
                if _less(v[idx[pr]], v[idx[pm]]):
                    idx[pr], idx[pm] = idx[pm], idx[pr]
                if _less(v[idx[pm]], v[idx[pl]]):
                    idx[pm], idx[pl] = idx[pl], idx[pm]
                vp = v[idx[pm]]
                pi, pj = pl, pr - 1
                idx[pm], idx[pj] = idx[pj], idx[pm]
                while True:
                    pi += 1
                    while _less(v[idx[pi]], vp):
                        pi += 1
                    pj -= 1
                    while _less(vp, v[idx[pj]]):
                        pj -= 1
                    if pi >= pj:
                        break
                    idx[pi], idx[pj] = idx[pj], idx[pi]
                pk = pr - 1
                idx[pi], idx[pk] = idx[pk], idx[pi]
                depth -= 1
                # the larger partition waits on the stack, the smaller one is sorted next
                if pi - pl < pr - pi:
                    stack.append((pi + 1, pr, depth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, depth))
                    pl = pi + 1
            # insertion sort of idx[pl .. pr] (stable)
            for pi in range(pl + 1, pr + 1):
                vi = idx[pi]
                vp = v[vi]
                pj = pi
                while pj > pl and _less(vp, v[idx[pj - 1]]):
                    idx[pj] = idx[pj - 1]
                    pj -= 1
                idx[pj] = vi
        if not stack:
            break
        pl, pr, depth = stack.pop()
    return np.asarray(idx, dtype=np.int64)


def _top_blocks(overlaps: np.ndarray, top: int) -> np.ndarray:
    """``np.argsort(overlaps)[::-1][:top]`` with the classic introsort's tie order."""
    if len(overlaps) <= SMALL_QUICKSORT + 1:
        # at most 17 items: the introsort is one insertion sort, i.e. stable
        order = np.argsort(overlaps, kind="stable")
    else:
        order = classic_argsort(overlaps)
    return order[::-1][:top]


def _axis_overlaps(lo: float, hi: float, grid: int) -> tuple[list[int], list[float]]:
    """Blocks ``i = int(lo G) .. int(hi G)`` (skipping ``i >= G``) and the box's extent in each:
    ``min(hi, (i + 1) / G) - max(lo, i / G)`` (may be <= 0 for a block that only touches)."""
    blocks, extents = [], []
    for i in range(int(lo * grid), int(hi * grid) + 1):
        if i >= grid:
            continue
        blocks.append(i)
        extents.append(min(hi, (i + 1) / grid) - max(lo, i / grid))
    return blocks, extents


def _region_row(
    box: np.ndarray, height: float, width: float, grid: int, top: int, out: np.ndarray
) -> None:
    """Fill ``out [2 top + 1]`` (indices, weights, area) for one pixel box (x1, y1, x2, y2)."""
    x1p, y1p, x2p, y2p = (float(c) for c in box)
    x1, x2 = min(x1p / width, 1.0), min(x2p / width, 1.0)
    y1, y2 = min(y1p / height, 1.0), min(y2p / height, 1.0)
    if min(x1, y1) < -1.0 / grid:
        raise ValueError(
            f"box {[x1p, y1p, x2p, y2p]} in an image of height {height} and width {width} "
            f"reaches more than one grid block left of / above the image"
        )
    bx, ex = _axis_overlaps(x1, x2, grid)
    by, ey = _axis_overlaps(y1, y2, grid)
    index: list[int] = []
    overlap: list[float] = []
    for i_x, o_x in zip(bx, ex, strict=True):  # x-major, as the block index
        for i_y, o_y in zip(by, ey, strict=True):
            o = o_x * o_y
            if o > 0:  # blocks that merely touch the box are dropped
                index.append(i_x * grid + i_y)
                overlap.append(o)
    out[: 2 * top] = 0.0
    out[:top] = grid * grid  # padding block
    if overlap:
        ov = np.asarray(overlap, dtype=np.float64)
        keep = _top_blocks(ov, top)
        kept = ov[keep]
        out[: len(keep)] = np.asarray(index, dtype=np.float64)[keep]
        out[top : top + len(keep)] = kept / kept.sum()
    out[2 * top] = (x2p - x1p) * (y2p - y1p) / (height * width)


def pfan_positions(
    boxes: np.ndarray, img_sizes: np.ndarray, grid: int = 16, top_blocks: int = 15
) -> np.ndarray:
    """PFAN position rows of every region (docs/pfan.md).

    Per region: the box (pixels) is normalised by the image width / height and clipped to 1
    from above (never from below); the blocks ``i_x = int(x1 G) .. int(x2 G)`` and ``i_y``
    likewise (blocks ``>= G`` skipped) are visited x-major, and each block's overlap with the
    box (product of the two extents) is kept when > 0. The ``top_blocks`` largest overlaps
    survive, chosen as ``np.argsort(overlaps)[::-1][:top_blocks]`` with the classic introsort's
    tie order (module docstring); their weights are divided by their sum. Missing slots get index
    ``G * G`` and weight 0. The area is ``(x2 - x1)(y2 - y1) / (h w)`` of the UNclipped pixel
    box. A box with no block of positive overlap (zero width or height) gets only padding slots.

    Args:
        boxes: ``[N, K, 4]`` (or ``[K, 4]``) boxes ``x1, y1, x2, y2`` in pixels, as bottom-up
            attention writes them.
        img_sizes: ``[N, 2]`` (or ``[2]``) image ``height, width`` in pixels.
        grid: grid size ``G`` (16).
        top_blocks: blocks kept per region ``T`` (15).

    Returns:
        float64 ``[N, K, 2 T + 1]``: ``T`` block indices (as floats), ``T`` weights, the area.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    sizes = np.asarray(img_sizes, dtype=np.float64)
    single = boxes.ndim == 2
    if single:
        boxes, sizes = boxes[None], sizes.reshape(1, -1)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, K, 4] (x1, y1, x2, y2), got shape {boxes.shape}")
    if sizes.shape != (boxes.shape[0], 2):
        raise ValueError(
            f"img_sizes must be [{boxes.shape[0]}, 2] (height, width per image), got shape "
            f"{sizes.shape}"
        )
    if grid < 1 or top_blocks < 1:
        raise ValueError(f"grid and top_blocks must be >= 1, got {grid}, {top_blocks}")
    if not np.isfinite(boxes).all() or not np.isfinite(sizes).all():
        raise ValueError("boxes and img_sizes must be finite")
    if (sizes <= 0).any():
        bad = int(np.flatnonzero((sizes <= 0).any(axis=1))[0])
        raise ValueError(f"img_sizes must be positive, image {bad} has {sizes[bad].tolist()}")
    n, k = boxes.shape[:2]
    out = np.empty((n, k, 2 * top_blocks + 1), dtype=np.float64)
    for i in range(n):
        height, width = float(sizes[i, 0]), float(sizes[i, 1])
        for r in range(k):
            _region_row(boxes[i, r], height, width, grid, top_blocks, out[i, r])
    return out[0] if single else out


def position_columns(width: int, top_blocks: int = 15) -> str:
    """What a ``<split>_boxes.npy`` with last dimension ``width`` holds: ``"boxes"`` (4
    columns), ``"positions"`` (``2T`` or ``2T + 1``: the authors' released PFAN rows), or
    raise ``ValueError`` naming the widths accepted."""
    if width == 4:
        return "boxes"
    if width in (2 * top_blocks, 2 * top_blocks + 1):
        return "positions"
    raise ValueError(
        f"last dimension {width}: expected 4 (boxes x1, y1, x2, y2) or {2 * top_blocks} / "
        f"{2 * top_blocks + 1} (PFAN positions: {top_blocks} block indices, {top_blocks} "
        "weights, optional area)"
    )
