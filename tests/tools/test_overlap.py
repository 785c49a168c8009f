import torch

from indexcache.tools.overlap import pairwise_overlap, row_overlap


def test_row_overlap_counts_sets_not_order():
    a = torch.tensor([[3, 1, 7, -1]])
    b = torch.tensor([[7, 2, 3, -1]])
    inter, n = row_overlap(a, b)
    assert inter.tolist() == [2] and n.tolist() == [3]


def test_self_overlap_is_one_and_disjoint_is_zero():
    g = torch.Generator().manual_seed(0)
    T, k = 50, 8
    rows = [torch.randperm(t + 1, generator=g)[:k] for t in range(T)]
    a = torch.stack([torch.nn.functional.pad(r, (0, k - len(r)), value=-1) for r in rows])[None]
    shifted = torch.where(a >= 0, a + 1000, a)  # no shared token
    ov = pairwise_overlap([a, a.clone(), shifted])
    assert ov[0, 1] == 1.0 and ov[0, 0] == 1.0
    assert ov[0, 2] == 0.0


def _decode_png(path):
    import struct
    import zlib

    data = open(path, "rb").read()
    w, h = struct.unpack(">II", data[16:24])
    raw = zlib.decompress(data[data.index(b"IDAT") + 4: data.index(b"IEND") - 8])
    rows = [raw[y * (1 + 3 * w) + 1:(y + 1) * (1 + 3 * w)] for y in range(h)]
    return w, h, [[tuple(r[3 * x:3 * x + 3]) for x in range(w)] for r in rows]


def test_heatmap_png_has_axis_labels_and_colour_bar_values(tmp_path):
    from indexcache.tools.overlap import _GLYPHS, _colormap, write_heatmap_png

    g = torch.Generator().manual_seed(3)
    m = torch.rand(10, 10, generator=g, dtype=torch.float64)
    w, h, px = _decode_png(write_heatmap_png(m, str(tmp_path / "h.png"), cell=16))
    black, white = (0, 0, 0), (255, 255, 255)
    colour = [(x, y) for y in range(h) for x in range(w) if px[y][x] not in (black, white)]
    x0, x1 = min(x for x, _ in colour), max(x for x, _ in colour)
    y0, y1 = min(y for _, y in colour), max(y for _, y in colour)
    assert px[y0][x0] == _colormap(float(m[0, 0]))  # top-left cell is layer 0 x layer 0
    assert px[y0 + 16 * 9][x0 + 16 * 9] == _colormap(float(m[9, 9]))

    def dark(xs, ys):
        return sum(px[y][x] == black for y in ys for x in xs)

    assert dark(range(0, x0), range(y0, y1 + 1)) > 50  # layer numbers and title left of the grid
    assert dark(range(x0, x0 + 160), range(y1 + 1, h)) > 50  # layer numbers and title under the grid
    assert dark(range(x1 + 1, w), range(y0, y1 + 1)) > 30  # colour-bar values right of the bar
    assert dark(range(x0 + 160, w), range(0, y0)) > 10  # colour-bar title above it
    assert set("0123456789.") <= set(_GLYPHS)
