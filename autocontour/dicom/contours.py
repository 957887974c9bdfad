"""Mask slices to RTSTRUCT polygons and back, so that a planning system sees exactly our voxels.

Planning systems (and plastimatch, dicompyler-core) rasterise a contour by
asking, for each voxel centre, whether it lies inside the polygon. A polygon
through the centres of the edge voxels therefore loses about half of every
edge voxel. Here the polygons run along the voxel *boundaries* (the lattice
of pixel corners): no voxel centre ever lies on a contour, so any centre-based
rasteriser gives back the mask exactly.

Each 4-connected piece of a slice becomes one polygon; its holes are joined to
it by a zero-width "keyhole" cut (the cut is traversed once each way, so it
encloses nothing). A keyholed polygon means the same thing to systems that
combine a slice's contours by union and to those that combine them by XOR,
which is not true of a separate inner contour. An island inside a hole is a
polygon of its own. Every polygon has at least 4 points; one that would
exceed a DICOM value's 64 KiB is cut into bands of rows that meet along a
voxel boundary (so, again, union and XOR agree).
"""

from __future__ import annotations

import numpy as np
from matplotlib.path import Path as PolygonPath
from scipy import ndimage

# Directed boundary edges of a foreground pixel at (row r, column c), in corner coordinates (x = column, y = row):
# walked clockwise on screen, so outer boundaries have positive and holes negative shoelace area.
_SIDES = (  # (neighbour offset (dr, dc), edge start (dx, dy), edge end (dx, dy))
    ((-1, 0), (0, 0), (1, 0)),  # top
    ((0, 1), (1, 0), (1, 1)),  # right
    ((1, 0), (1, 1), (0, 1)),  # bottom
    ((0, -1), (0, 1), (0, 0)),  # left
)


def _loops(piece: np.ndarray) -> list[list[tuple[int, int]]]:
    """The closed boundary loops of a 2D mask, as corner-coordinate vertices with no collinear ones."""
    padded = np.pad(piece, 1)
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (dr, dc), start, end in _SIDES:
        neighbour = padded[1 + dr:padded.shape[0] - 1 + dr, 1 + dc:padded.shape[1] - 1 + dc]
        rows, cols = np.nonzero(piece & ~neighbour)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            outgoing.setdefault((c + start[0], r + start[1]), []).append((c + end[0], r + end[1]))
    loops = []
    while outgoing:
        # a loop's top-left vertex is never where two pieces touch, so it is a safe start
        first = min(outgoing, key=lambda v: (v[1], v[0]))
        loop: list[tuple[int, int]] = []
        vertex, heading = first, (0, 0)
        while True:
            loop.append(vertex)
            ends = outgoing[vertex]
            if len(ends) == 1:
                end = ends[0]
            else:  # two pixels touch at a corner: turn tightly round the pixel, so diagonal pixels stay apart
                end = next(e for e in ends if heading[0] * (e[1] - vertex[1]) - heading[1] * (e[0] - vertex[0]) > 0)
            ends.remove(end)
            if not ends:
                del outgoing[vertex]
            heading = (end[0] - vertex[0], end[1] - vertex[1])
            vertex = end
            if vertex == first:
                break
        loops.append(_without_collinear(loop))
    return loops


def _without_collinear(loop: list[tuple[int, int]]) -> list[tuple[int, int]]:
    kept = []
    n = len(loop)
    for i, (x, y) in enumerate(loop):
        (px, py), (nx, ny) = loop[i - 1], loop[(i + 1) % n]
        if (x - px) * (ny - y) - (y - py) * (nx - x) != 0:
            kept.append((x, y))
    return kept


def _area2(loop: list[tuple[int, int]]) -> int:
    """Twice the signed (shoelace) area."""
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(loop, loop[1:] + loop[:1], strict=True))


def _bridge(polygon: list[tuple[int, int]], hole: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join a hole to the polygon around it by a vertical cut up from the hole's top-left vertex."""
    top = min(range(len(hole)), key=lambda i: (hole[i][1], hole[i][0]))
    hx, hy = hole[top]
    best: int | None = None
    hit_y: int | None = None
    for i, ((x0, y0), (x1, y1)) in enumerate(zip(polygon, polygon[1:] + polygon[:1], strict=True)):
        if y0 == y1 and y0 < hy and min(x0, x1) <= hx <= max(x0, x1) and (hit_y is None or y0 > hit_y):
            best, hit_y = i, y0
    if best is None or hit_y is None:
        raise ValueError("a hole must lie inside its polygon")
    hit = (hx, hit_y)
    rotated = hole[top:] + hole[:top]
    cut = [hit, *rotated, rotated[0], hit]
    if polygon[best] == hit:
        cut = cut[1:]
    if polygon[(best + 1) % len(polygon)] == hit:
        cut = cut[:-1]
    return polygon[:best + 1] + cut + polygon[best + 1:]


def _keyholed(piece: np.ndarray) -> list[tuple[int, int]]:
    """One polygon for a 4-connected piece: its outer boundary with every hole bridged in, top holes first."""
    loops = _loops(piece)
    polygon = max(loops, key=_area2)
    for hole in sorted((lp for lp in loops if lp is not polygon), key=lambda lp: min((y, x) for x, y in lp)):
        polygon = _bridge(polygon, hole)
    return polygon


def _pieces(mask: np.ndarray, row: int, column: int, max_points: int | None) -> list[np.ndarray]:
    labels, _ = ndimage.label(mask)  # 4-connected
    polygons = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        piece = labels[box] == label
        top, left = row + box[0].start, column + box[1].start
        polygon = _keyholed(piece)
        if max_points is None or len(polygon) <= max_points or piece.shape[0] == 1:
            polygons.append(np.asarray(polygon, dtype=float) + (left - 0.5, top - 0.5))
        else:  # too long for one contour: two bands of rows, which meet on a voxel boundary
            half = piece.shape[0] // 2
            polygons += _pieces(piece[:half], top, left, max_points) + _pieces(piece[half:], top + half, left,
                                                                               max_points)
    return polygons


def slice_polygons(mask: np.ndarray, max_points: int | None = None) -> list[np.ndarray]:
    """Polygons (k x 2 arrays of (column, row) pixel coordinates, pixel centres at integers) whose
    centre-based rasterisation is exactly `mask` (2D, rows x columns). A piece whose polygon would have more
    than `max_points` points is cut into bands of rows."""
    return _pieces(mask, 0, 0, max_points)


def rasterise(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Voxel centres inside the polygons ((column, row) pixel coordinates), a slice's contours
    combined by XOR, as planning systems that support holes do."""
    result = np.zeros(shape, dtype=bool)
    for polygon in polygons:
        low = np.clip(np.floor(polygon.min(axis=0)).astype(int), 0, None)
        high = np.minimum(np.ceil(polygon.max(axis=0)).astype(int) + 1, (shape[1], shape[0]))
        if np.any(high <= low):
            continue
        cols, rows = np.meshgrid(np.arange(low[0], high[0]), np.arange(low[1], high[1]))
        centres = np.column_stack([cols.ravel(), rows.ravel()])
        inside = PolygonPath(polygon, closed=False).contains_points(centres).reshape(cols.shape)
        result[low[1]:high[1], low[0]:high[0]] ^= inside
    return result
