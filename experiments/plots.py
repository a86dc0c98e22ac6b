"""Figures of the evidence experiments, drawn with PIL only (the project does not depend on matplotlib).

- grid(images, columns): uint8 images (N, H, W[, C]) -> one PIL image, scaled up with nearest neighbours.
- side_by_side(panels, titles): sample grids next to each other, a title above each.
- line_plot(series, ...): lines with error bars, e.g. Frechet distance against sampling steps.
"""

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (127, 127, 127)]


def grid(images, columns=8, scale=3, gap=1):
    """uint8 (N, H, W) or (N, H, W, C) -> PIL image of `columns` columns, each image scaled by `scale`."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[3] == 1:
        x = np.repeat(x, 3, axis=3)
    n, h, w, _ = x.shape
    rows = (n + columns - 1) // columns
    canvas = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = x[i]
    image = PIL.Image.fromarray(canvas)
    return image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST)


def side_by_side(panels, titles, margin=6, title_height=14):
    """PIL images in a row with a one-line title above each."""
    font = PIL.ImageFont.load_default()
    width = sum(p.width for p in panels) + margin * (len(panels) + 1)
    height = max(p.height for p in panels) + title_height + 2 * margin
    out = PIL.Image.new('RGB', (width, height), 'white')
    draw = PIL.ImageDraw.Draw(out)
    x = margin
    for panel, title in zip(panels, titles):
        draw.text((x, margin // 2), title, fill='black', font=font)
        out.paste(panel, (x, margin + title_height))
        x += panel.width + margin
    return out


def line_plot(series, xlabel, ylabel, title='', size=(420, 300), log_x=False):
    """series: list of (label, xs, means, stds or None). Returns a PIL image with axes, ticks, error bars, legend."""
    font = PIL.ImageFont.load_default()
    width, height = size
    left, right, top, bottom = 52, 12, 24, 40
    out = PIL.Image.new('RGB', size, 'white')
    draw = PIL.ImageDraw.Draw(out)
    fx = (lambda v: np.log10(v)) if log_x else (lambda v: v)
    xs = [fx(v) for _, x, _, _ in series for v in x]
    lows = [m - (s or 0) for _, _, ms, ss in series for m, s in zip(ms, ss or [0] * len(ms))]
    highs = [m + (s or 0) for _, _, ms, ss in series for m, s in zip(ms, ss or [0] * len(ms))]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(lows)), max(highs) * 1.08
    x1 = x1 if x1 > x0 else x0 + 1
    px = lambda v: left + (fx(v) - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    py = lambda v: height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill='black')
    for v in sorted({v for _, x, _, _ in series for v in x}):
        draw.line([(px(v), height - bottom), (px(v), height - bottom + 4)], fill='black')
        draw.text((px(v) - 6, height - bottom + 6), f'{v:g}', fill='black', font=font)
    for k in range(6):
        v = y0 + (y1 - y0) * k / 5
        draw.line([(left - 4, py(v)), (left, py(v))], fill='black')
        draw.text((2, py(v) - 5), f'{v:.3g}', fill='black', font=font)
    draw.text((left + 4, height - 14), xlabel, fill='black', font=font)
    draw.text((left + 4, 4), (title + '  ' if title else '') + ylabel, fill='black', font=font)
    for k, (label, x, means, stds) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        points = [(px(a), py(m)) for a, m in zip(x, means)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for (a, b), s in zip(points, stds or [0] * len(points)):
            draw.ellipse([a - 3, b - 3, a + 3, b + 3], fill=colour)
            if s:
                top_y, bottom_y = b - s / (y1 - y0) * (height - top - bottom), b + s / (y1 - y0) * (
                    height - top - bottom)
                draw.line([(a, top_y), (a, bottom_y)], fill=colour)
                draw.line([(a - 3, top_y), (a + 3, top_y)], fill=colour)
                draw.line([(a - 3, bottom_y), (a + 3, bottom_y)], fill=colour)
        draw.text((width - right - 150, top + 4 + 12 * k), label, fill=colour, font=font)
    return out
