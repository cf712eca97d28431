//! Loss-curve charts written as PNG files.
//!
//! Everything is drawn here on a plain RGB pixel buffer: axes, ticks, grid, polylines, markers,
//! a legend and text set in a small built-in 5x7 bitmap font (with two rows for descenders), so
//! the only dependency is the `png` encoder. Files are written atomically (a `.tmp` sibling,
//! then a rename), so a reader never sees a half-written chart.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// One named line on a chart.
#[derive(Debug, Clone, Copy)]
pub struct Series<'a> {
    /// Name shown in the legend.
    pub name: &'a str,
    /// `(x, y)` points, drawn in order; points with a non-finite coordinate are skipped.
    pub points: &'a [(f64, f64)],
    /// Colour of the line, its markers and its legend entry.
    pub rgb: [u8; 3],
}

/// Width of the chart in pixels.
const WIDTH: i64 = 800;
/// Height of the chart in pixels.
const HEIGHT: i64 = 500;
/// Scale of the title text.
const TITLE_SCALE: i64 = 2;
/// Scale of the axis labels.
const LABEL_SCALE: i64 = 2;
/// Scale of the tick labels and the legend.
const SMALL_SCALE: i64 = 1;
/// Series with at most this many points also get a marker at each point.
const MARKER_MAX_POINTS: usize = 60;
/// Length of the tick marks outside the plot frame.
const TICK_LEN: i64 = 5;

const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [0, 0, 0];
const FRAME: [u8; 3] = [60, 60, 60];
const GRID: [u8; 3] = [228, 228, 228];
const LEGEND_BORDER: [u8; 3] = [170, 170, 170];

/// Draws a loss chart of `series` and writes it as an 800x500 RGB PNG to `path`.
///
/// The chart has a title, axis labels, numeric tick labels (integers on the x axis when all x
/// values are integers), a light grid, one 2 px polyline per series (plus a small marker at each
/// point when a series has few points) and a legend with each series' colour and name. Points
/// with a non-finite coordinate are skipped; with no points at all only the axes are drawn.
///
/// The file is written to `path` with `.tmp` appended, then renamed over `path`.
pub fn write_loss_png(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> io::Result<()> {
    let canvas = render(title, x_label, y_label, series);
    let mut encoded = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut encoded, canvas.w as u32, canvas.h as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(io::Error::other)?;
        writer
            .write_image_data(&canvas.px)
            .map_err(io::Error::other)?;
        writer.finish().map_err(io::Error::other)?;
    }
    write_atomic(path, &encoded)
}

/// Writes `bytes` to `path` + `.tmp`, syncs it, and renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp: OsString = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Lays out and draws the whole chart.
fn render(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Canvas {
    let mut c = Canvas::new(WIDTH, HEIGHT);

    let data: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let all = || data.iter().flatten();
    let x_int = all().all(|&(x, _)| x.fract() == 0.0);
    let x_range = min_max(all().map(|&(x, _)| x));
    let y_range = min_max(all().map(|&(_, y)| y));

    let y_axis = Axis::new(y_range, 6, false, 0.04);
    let y_tick_w = y_axis
        .labels
        .iter()
        .map(|l| text_width(l, SMALL_SCALE))
        .max()
        .unwrap_or(0);

    // Frame of the plot area (inclusive pixel coordinates).
    let left = 10 + 9 * LABEL_SCALE + 10 + y_tick_w + 4 + TICK_LEN;
    let right = WIDTH - 24;
    let top = 12 + 9 * TITLE_SCALE + 12;
    let bottom = HEIGHT - (8 + 9 * LABEL_SCALE + 10 + 7 * SMALL_SCALE + 6 + TICK_LEN);

    // Fewer x ticks when the labels would not fit between them.
    let mut x_axis = Axis::new(x_range, 7, x_int, 0.0);
    for target in (2..7).rev() {
        let widest = x_axis
            .labels
            .iter()
            .map(|l| text_width(l, SMALL_SCALE))
            .max()
            .unwrap_or(0);
        let spacing = if x_axis.ticks.len() > 1 {
            (right - left) as f64 * (x_axis.ticks[1] - x_axis.ticks[0]) / (x_axis.hi - x_axis.lo)
        } else {
            f64::INFINITY
        };
        if (widest + 12) as f64 <= spacing {
            break;
        }
        x_axis = Axis::new(x_range, target, x_int, 0.0);
    }

    let px =
        |x: f64| left as f64 + (x - x_axis.lo) / (x_axis.hi - x_axis.lo) * (right - left) as f64;
    let py =
        |y: f64| bottom as f64 - (y - y_axis.lo) / (y_axis.hi - y_axis.lo) * (bottom - top) as f64;

    // Grid, frame, ticks and tick labels.
    for &t in &x_axis.ticks {
        let x = px(t).round() as i64;
        c.fill_rect(x, top, 1, bottom - top + 1, GRID);
    }
    for &t in &y_axis.ticks {
        let y = py(t).round() as i64;
        c.fill_rect(left, y, right - left + 1, 1, GRID);
    }
    c.rect_outline(left, top, right, bottom, FRAME);
    for (&t, label) in x_axis.ticks.iter().zip(&x_axis.labels) {
        let x = px(t).round() as i64;
        c.fill_rect(x, bottom + 1, 1, TICK_LEN, FRAME);
        let w = text_width(label, SMALL_SCALE);
        c.text(x - w / 2, bottom + TICK_LEN + 4, label, SMALL_SCALE, BLACK);
    }
    for (&t, label) in y_axis.ticks.iter().zip(&y_axis.labels) {
        let y = py(t).round() as i64;
        c.fill_rect(left - TICK_LEN, y, TICK_LEN, 1, FRAME);
        let w = text_width(label, SMALL_SCALE);
        let text_y = y - (7 * SMALL_SCALE) / 2;
        c.text(left - TICK_LEN - 4 - w, text_y, label, SMALL_SCALE, BLACK);
    }

    // Title and axis labels.
    let title_w = text_width(title, TITLE_SCALE);
    let title_x = ((WIDTH - title_w) / 2).max(10);
    c.text(title_x, 12, title, TITLE_SCALE, BLACK);
    let xl_w = text_width(x_label, LABEL_SCALE);
    let xl_x = ((left + right - xl_w) / 2).max(4);
    c.text(
        xl_x,
        HEIGHT - 8 - 9 * LABEL_SCALE,
        x_label,
        LABEL_SCALE,
        BLACK,
    );
    let yl_w = text_width(y_label, LABEL_SCALE);
    let yl_y = ((top + bottom + yl_w) / 2).min(HEIGHT - 4);
    c.text_up(10, yl_y, y_label, LABEL_SCALE, BLACK);

    // Series, clipped to the plot frame.
    c.clip = (left, top, right, bottom);
    for (s, pts) in series.iter().zip(&data) {
        let mapped: Vec<(i64, i64)> = pts
            .iter()
            .map(|&(x, y)| (to_px(px(x)), to_px(py(y))))
            .collect();
        for w in mapped.windows(2) {
            c.line(w[0], w[1], 2, s.rgb);
        }
        if mapped.len() <= MARKER_MAX_POINTS {
            for &p in &mapped {
                c.marker(p, s.rgb);
            }
        }
    }
    c.clip = (0, 0, WIDTH - 1, HEIGHT - 1);

    draw_legend(&mut c, series, &data, (left, top, right, bottom));
    c
}

/// Draws the legend box in the corner of the plot frame `(left, top, right, bottom)` that covers
/// the fewest drawn data pixels, preferring the top right.
fn draw_legend(
    c: &mut Canvas,
    series: &[Series],
    data: &[Vec<(f64, f64)>],
    (left, top, right, bottom): (i64, i64, i64, i64),
) {
    if series.is_empty() {
        return;
    }
    let swatch = 26;
    let pad = 8;
    let row_h = 9 * SMALL_SCALE + 6;
    let name_w = series
        .iter()
        .map(|s| text_width(s.name, SMALL_SCALE))
        .max()
        .unwrap_or(0);
    let box_w = pad + swatch + 8 + name_w + pad;
    let box_h = pad + row_h * series.len() as i64 - 6 + pad;
    let (x_r, x_l) = (right - 10 - box_w, left + 10);
    let (y_t, y_b) = (top + 10, bottom - 10 - box_h);
    let corners = [(x_r, y_t), (x_l, y_t), (x_r, y_b), (x_l, y_b)];
    let (x0, y0) = corners
        .into_iter()
        .min_by_key(|&(x, y)| c.count_ink(x, y, box_w, box_h))
        .unwrap_or((x_r, y_t));
    c.fill_rect(x0, y0, box_w, box_h, WHITE);
    c.rect_outline(x0, y0, x0 + box_w - 1, y0 + box_h - 1, LEGEND_BORDER);
    for (i, (s, pts)) in series.iter().zip(data).enumerate() {
        let y = y0 + pad + row_h * i as i64;
        let mid = y + (7 * SMALL_SCALE) / 2;
        c.line((x0 + pad, mid), (x0 + pad + swatch - 1, mid), 2, s.rgb);
        if pts.len() <= MARKER_MAX_POINTS {
            c.marker((x0 + pad + swatch / 2, mid), s.rgb);
        }
        c.text(x0 + pad + swatch + 8, y, s.name, SMALL_SCALE, BLACK);
    }
}

/// Rounds a pixel coordinate, keeping it in a range that line drawing handles quickly.
fn to_px(v: f64) -> i64 {
    if v.is_nan() {
        return -1;
    }
    v.round().clamp(-10_000.0, 10_000.0) as i64
}

/// The smallest and largest of `vals`, or `None` when there are none.
fn min_max(vals: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    vals.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// The visible range of one axis with its ticks and their labels.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    labels: Vec<String>,
}

impl Axis {
    /// Picks a range covering `range` (padded by `pad` of its span) and about `target` ticks at
    /// "nice" values; `integer` keeps the tick step a whole number.
    fn new(range: Option<(f64, f64)>, target: usize, integer: bool, pad: f64) -> Axis {
        let (mut lo, mut hi) = match range {
            Some((lo, hi)) if (hi - lo).is_finite() => (lo, hi),
            _ => (0.0, 1.0),
        };
        if hi - lo <= 0.0 {
            let mut d = if lo != 0.0 { lo.abs() * 0.1 } else { 1.0 };
            if integer {
                d = d.max(1.0);
            }
            lo -= d;
            hi += d;
        }
        let span = hi - lo;
        lo -= pad * span;
        hi += pad * span;
        let span = hi - lo;
        let step = nice_step(span / target.max(1) as f64, integer);
        // Snap the ends out to a tick when that adds little empty space.
        let lo_snap = (lo / step).floor() * step;
        if lo - lo_snap <= 0.1 * span {
            lo = lo_snap;
        }
        let hi_snap = (hi / step).ceil() * step;
        if hi_snap - hi <= 0.1 * span {
            hi = hi_snap;
        }
        let first = (lo / step - 1e-9).ceil() as i64;
        let last = (hi / step + 1e-9).floor() as i64;
        let ticks: Vec<f64> = (first..=last).take(100).map(|i| i as f64 * step).collect();
        let labels = ticks
            .iter()
            .map(|&t| format_tick(t, step, integer))
            .collect();
        Axis {
            lo,
            hi,
            ticks,
            labels,
        }
    }
}

/// A step of 1, 2, 2.5 or 5 times a power of ten close to `raw` (no 2.5 and at least 1 when
/// `integer`).
fn nice_step(raw: f64, integer: bool) -> f64 {
    if !(raw > 0.0 && raw.is_finite()) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 2.5 && !(integer && mag < 10.0) {
        2.5
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    let step = nice * mag;
    if integer {
        step.max(1.0)
    } else {
        step
    }
}

/// Formats a tick value with as many decimals as `step` needs.
fn format_tick(v: f64, step: f64, integer: bool) -> String {
    let v = if v.abs() < step * 1e-6 { 0.0 } else { v };
    if integer && v.abs() < 1e12 {
        return format!("{}", v.round() as i64);
    }
    let mag = v.abs().max(step);
    if mag >= 1e6 || step < 1e-4 {
        return format_sci(v, step);
    }
    let mut decimals = 0;
    while decimals < 8 {
        let scaled = step * 10f64.powi(decimals);
        if (scaled - scaled.round()).abs() <= 1e-6 * scaled.abs().max(1.0) {
            break;
        }
        decimals += 1;
    }
    format!("{:.*}", decimals as usize, v)
}

/// Formats `v` as `1.5e6` with up to 3 significant digits, trailing zeros trimmed.
fn format_sci(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let digits = ((v.abs().log10().floor() - step.log10().floor()) as i64).clamp(0, 2) as usize;
    let s = format!("{:.*e}", digits, v);
    match s.split_once('e') {
        Some((mant, exp)) if mant.contains('.') => {
            let mant = mant.trim_end_matches('0').trim_end_matches('.');
            format!("{mant}e{exp}")
        }
        _ => s,
    }
}

/// Width in pixels of `text` set at `scale`.
fn text_width(text: &str, scale: i64) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * 6 - 1) * scale
    }
}

/// An RGB pixel buffer with a clip rectangle.
struct Canvas {
    w: i64,
    h: i64,
    px: Vec<u8>,
    /// Inclusive `(left, top, right, bottom)`; pixels outside are not drawn.
    clip: (i64, i64, i64, i64),
}

impl Canvas {
    /// A white canvas of `w` x `h` pixels.
    fn new(w: i64, h: i64) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; (w * h * 3) as usize],
            clip: (0, 0, w - 1, h - 1),
        }
    }

    /// Sets one pixel, if it is inside the canvas and the clip rectangle.
    fn set(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        let (l, t, r, b) = self.clip;
        if x < l.max(0) || y < t.max(0) || x > r.min(self.w - 1) || y > b.min(self.h - 1) {
            return;
        }
        let i = ((y * self.w + x) * 3) as usize;
        self.px[i..i + 3].copy_from_slice(&rgb);
    }

    /// Fills a `w` x `h` rectangle with its top-left corner at `(x, y)`.
    fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, rgb: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, rgb);
            }
        }
    }

    /// Counts pixels in a `w` x `h` rectangle that are neither background nor grid.
    fn count_ink(&self, x: i64, y: i64, w: i64, h: i64) -> usize {
        let mut n = 0;
        for yy in y.max(0)..(y + h).min(self.h) {
            for xx in x.max(0)..(x + w).min(self.w) {
                let i = ((yy * self.w + xx) * 3) as usize;
                let p = [self.px[i], self.px[i + 1], self.px[i + 2]];
                if p != WHITE && p != GRID {
                    n += 1;
                }
            }
        }
        n
    }

    /// Draws the 1 px outline of the rectangle with inclusive corners `(l, t)` and `(r, b)`.
    fn rect_outline(&mut self, l: i64, t: i64, r: i64, b: i64, rgb: [u8; 3]) {
        self.fill_rect(l, t, r - l + 1, 1, rgb);
        self.fill_rect(l, b, r - l + 1, 1, rgb);
        self.fill_rect(l, t, 1, b - t + 1, rgb);
        self.fill_rect(r, t, 1, b - t + 1, rgb);
    }

    /// Draws a line with a square pen of `width` pixels (Bresenham).
    fn line(&mut self, from: (i64, i64), to: (i64, i64), width: i64, rgb: [u8; 3]) {
        let (mut x, mut y) = from;
        let (x1, y1) = to;
        let dx = (x1 - x).abs();
        let dy = -(y1 - y).abs();
        let sx = if x < x1 { 1 } else { -1 };
        let sy = if y < y1 { 1 } else { -1 };
        let mut err = dx + dy;
        let off = (width - 1) / 2;
        loop {
            self.fill_rect(x - off, y - off, width, width, rgb);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Draws a small filled disc (radius about 3 px) centred on `p`.
    fn marker(&mut self, p: (i64, i64), rgb: [u8; 3]) {
        for dy in -3..=3i64 {
            for dx in -3..=3i64 {
                if dx * dx + dy * dy <= 10 {
                    self.set(p.0 + dx, p.1 + dy, rgb);
                }
            }
        }
    }

    /// Draws `text` left to right with the top-left of its first glyph at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, rgb: [u8; 3]) {
        for (i, ch) in text.chars().enumerate() {
            let ox = x + i as i64 * 6 * scale;
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let (gx, gy) = (ox + col * scale, y + row as i64 * scale);
                        self.fill_rect(gx, gy, scale, scale, rgb);
                    }
                }
            }
        }
    }

    /// Draws `text` rotated a quarter turn anticlockwise, reading upwards from `y`, with the
    /// tops of the glyphs at column `x`.
    fn text_up(&mut self, x: i64, y: i64, text: &str, scale: i64, rgb: [u8; 3]) {
        for (i, ch) in text.chars().enumerate() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let u = (i as i64 * 6 + col) * scale;
                        let v = row as i64 * scale;
                        self.fill_rect(x + v, y - u - scale + 1, scale, scale, rgb);
                    }
                }
            }
        }
    }
}

/// The bitmap of `ch`: a box for anything outside printable ASCII.
fn glyph(ch: char) -> &'static [u8; 9] {
    let code = ch as u32;
    if (0x20..0x7f).contains(&code) {
        &FONT[(code - 0x20) as usize]
    } else {
        &BOX_GLYPH
    }
}

/// Glyph drawn for characters the font lacks.
const BOX_GLYPH: [u8; 9] = [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F, 0x00, 0x00];

/// A 5x7 font for printable ASCII (`' '` to `'~'`), one glyph per character: nine rows, top
/// first, of five pixels each (bit 4 is the leftmost). Rows 0-6 hold capitals and digits; rows
/// 7-8 hold descenders.
#[rustfmt::skip]
const FONT: [[u8; 9]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04, 0x00, 0x00], // '!'
    [0x0A, 0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '"'
    [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A, 0x00, 0x00], // '#'
    [0x04, 0x0F, 0x14, 0x0E, 0x05, 0x1E, 0x04, 0x00, 0x00], // '$'
    [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03, 0x00, 0x00], // '%'
    [0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D, 0x00, 0x00], // '&'
    [0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // "'"
    [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02, 0x00, 0x00], // '('
    [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08, 0x00, 0x00], // ')'
    [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00, 0x00, 0x00], // '*'
    [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00, 0x00, 0x00], // '+'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08, 0x00], // ','
    [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00, 0x00, 0x00], // '-'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C, 0x00, 0x00], // '.'
    [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00, 0x00, 0x00], // '/'
    [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E, 0x00, 0x00], // '0'
    [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00], // '1'
    [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F, 0x00, 0x00], // '2'
    [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E, 0x00, 0x00], // '3'
    [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02, 0x00, 0x00], // '4'
    [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E, 0x00, 0x00], // '5'
    [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E, 0x00, 0x00], // '6'
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08, 0x00, 0x00], // '7'
    [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E, 0x00, 0x00], // '8'
    [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C, 0x00, 0x00], // '9'
    [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00, 0x00, 0x00], // ':'
    [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x04, 0x08, 0x00, 0x00], // ';'
    [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02, 0x00, 0x00], // '<'
    [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00, 0x00, 0x00], // '='
    [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08, 0x00, 0x00], // '>'
    [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04, 0x00, 0x00], // '?'
    [0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E, 0x00, 0x00], // '@'
    [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00, 0x00], // 'A'
    [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E, 0x00, 0x00], // 'B'
    [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E, 0x00, 0x00], // 'C'
    [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C, 0x00, 0x00], // 'D'
    [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F, 0x00, 0x00], // 'E'
    [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10, 0x00, 0x00], // 'F'
    [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F, 0x00, 0x00], // 'G'
    [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00, 0x00], // 'H'
    [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00], // 'I'
    [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C, 0x00, 0x00], // 'J'
    [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11, 0x00, 0x00], // 'K'
    [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F, 0x00, 0x00], // 'L'
    [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11, 0x00, 0x00], // 'M'
    [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x00, 0x00], // 'N'
    [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00], // 'O'
    [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10, 0x00, 0x00], // 'P'
    [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D, 0x00, 0x00], // 'Q'
    [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11, 0x00, 0x00], // 'R'
    [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E, 0x00, 0x00], // 'S'
    [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00], // 'T'
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00], // 'U'
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00, 0x00], // 'V'
    [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A, 0x00, 0x00], // 'W'
    [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11, 0x00, 0x00], // 'X'
    [0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00], // 'Y'
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F, 0x00, 0x00], // 'Z'
    [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E, 0x00, 0x00], // '['
    [0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00, 0x00, 0x00], // '\\'
    [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E, 0x00, 0x00], // ']'
    [0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '^'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F, 0x00], // '_'
    [0x08, 0x04, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '`'
    [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F, 0x00, 0x00], // 'a'
    [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E, 0x00, 0x00], // 'b'
    [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E, 0x00, 0x00], // 'c'
    [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F, 0x00, 0x00], // 'd'
    [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E, 0x00, 0x00], // 'e'
    [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08, 0x00, 0x00], // 'f'
    [0x00, 0x00, 0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E], // 'g'
    [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00, 0x00], // 'h'
    [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00], // 'i'
    [0x02, 0x00, 0x06, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C], // 'j'
    [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12, 0x00, 0x00], // 'k'
    [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00], // 'l'
    [0x00, 0x00, 0x1A, 0x15, 0x15, 0x15, 0x15, 0x00, 0x00], // 'm'
    [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00, 0x00], // 'n'
    [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00], // 'o'
    [0x00, 0x00, 0x1E, 0x11, 0x11, 0x11, 0x1E, 0x10, 0x10], // 'p'
    [0x00, 0x00, 0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x01], // 'q'
    [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10, 0x00, 0x00], // 'r'
    [0x00, 0x00, 0x0F, 0x10, 0x0E, 0x01, 0x1E, 0x00, 0x00], // 's'
    [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06, 0x00, 0x00], // 't'
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D, 0x00, 0x00], // 'u'
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00, 0x00], // 'v'
    [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A, 0x00, 0x00], // 'w'
    [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x00, 0x00], // 'x'
    [0x00, 0x00, 0x11, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E], // 'y'
    [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F, 0x00, 0x00], // 'z'
    [0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02, 0x00, 0x00], // '{'
    [0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00], // '|'
    [0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08, 0x00, 0x00], // '}'
    [0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00, 0x00, 0x00], // '~'
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes the PNG at `path` into (width, height, RGB bytes).
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let file = io::BufReader::new(File::open(path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn count_colour(px: &[u8], rgb: [u8; 3]) -> usize {
        px.chunks_exact(3).filter(|p| *p == rgb).count()
    }

    #[test]
    fn writes_png_with_each_series_colour() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let train: Vec<(f64, f64)> = (0..200)
            .map(|i| (i as f64, 8.0 / (1.0 + i as f64 / 20.0) + 2.0))
            .collect();
        let val = [
            (0.0, 9.5),
            (50.0, 4.0),
            (f64::NAN, 3.0),
            (100.0, 3.2),
            (199.0, f64::INFINITY),
        ];
        let series = [
            Series {
                name: "train",
                points: &train,
                rgb: [31, 119, 180],
            },
            Series {
                name: "val_loss",
                points: &val,
                rgb: [214, 39, 40],
            },
        ];
        write_loss_png(&path, "Loss (test)", "step", "loss", &series).unwrap();
        assert!(!dir.path().join("loss.png.tmp").exists());
        let (w, h, px) = decode(&path);
        assert_eq!((w, h), (WIDTH as u32, HEIGHT as u32));
        // Far more than the legend swatch alone would give.
        assert!(count_colour(&px, [31, 119, 180]) > 500);
        assert!(count_colour(&px, [214, 39, 40]) > 200);
        assert!(count_colour(&px, BLACK) > 100, "text and labels");
    }

    #[test]
    fn empty_and_single_point_series_draw_axes() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.png");
        write_loss_png(&empty, "empty", "step", "loss", &[]).unwrap();
        let (w, h, px) = decode(&empty);
        assert_eq!((w, h), (WIDTH as u32, HEIGHT as u32));
        assert!(count_colour(&px, FRAME) > 1000);

        let one = [(5.0, 2.5)];
        let nan = [(f64::NAN, f64::NAN)];
        let series = [
            Series {
                name: "one",
                points: &one,
                rgb: [0, 160, 0],
            },
            Series {
                name: "nothing",
                points: &[],
                rgb: [200, 0, 200],
            },
            Series {
                name: "nan",
                points: &nan,
                rgb: [0, 0, 200],
            },
        ];
        let single = dir.path().join("single.png");
        write_loss_png(&single, "", "", "", &series).unwrap();
        let (_, _, px) = decode(&single);
        assert!(count_colour(&px, [0, 160, 0]) > 0);
    }

    #[test]
    fn overwrites_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        fs::write(&path, b"old").unwrap();
        let pts = [(1.0, 1.0), (2.0, 0.5)];
        let series = [Series {
            name: "a",
            points: &pts,
            rgb: [1, 2, 3],
        }];
        write_loss_png(&path, "t", "x", "y", &series).unwrap();
        assert_eq!(decode(&path).0, WIDTH as u32);
    }

    #[test]
    fn tick_labels() {
        assert_eq!(format_tick(300.0, 50.0, true), "300");
        assert_eq!(format_tick(2.5, 0.5, false), "2.5");
        assert_eq!(format_tick(2.0, 0.5, false), "2.0");
        assert_eq!(format_tick(0.25, 0.25, false), "0.25");
        assert_eq!(format_tick(-1e-17, 0.2, false), "0.0");
        assert_eq!(format_tick(4.0, 2.0, false), "4");
        assert_eq!(format_tick(1.5e6, 5e5, false), "1.5e6");
        let axis = Axis::new(Some((3.1, 10.9)), 6, false, 0.04);
        assert!(axis.lo <= 3.1 && axis.hi >= 10.9);
        assert!(
            axis.ticks.len() >= 3 && axis.ticks.len() <= 12,
            "{:?}",
            axis.ticks
        );
        let axis = Axis::new(Some((0.0, 3.0)), 7, true, 0.0);
        assert!(
            axis.ticks.iter().all(|t| t.fract() == 0.0),
            "{:?}",
            axis.ticks
        );
    }
}
