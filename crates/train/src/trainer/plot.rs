//! The loss curve as a PNG, with no font or image dependency: an indexed-colour raster, a
//! built-in 3×5 pixel font for the tick labels and legend, and a PNG writer whose deflate
//! stream is run-length coded (distance-1 matches in one fixed-Huffman block): a plot is
//! mostly long runs of one colour, so this alone makes it small.

use std::path::Path;

use super::error::{Result, TrainerError};
use super::metrics::History;

const W: usize = 800;
const H: usize = 480;
/// Plot area inside the margins (left, top, right, bottom).
const L: usize = 70;
const T: usize = 30;
const R: usize = W - 20;
const B: usize = H - 40;

/// Palette indices.
const WHITE: u8 = 0;
const GRID: u8 = 1;
const INK: u8 = 2;
const TRAIN: u8 = 3;
const EVAL: u8 = 4;
const PALETTE: [[u8; 3]; 5] = [
    [255, 255, 255],
    [225, 225, 225],
    [40, 40, 40],
    [31, 119, 180],
    [214, 39, 40],
];

/// 3×5 glyphs, rows top to bottom, 3 bits per row (bit 2 = left column).
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'a' => [0, 7, 1, 7, 7],
        'e' => [7, 5, 7, 4, 7],
        'i' => [2, 0, 2, 2, 2],
        'l' => [2, 2, 2, 2, 3],
        'n' => [0, 6, 5, 5, 5],
        'o' => [0, 7, 5, 5, 7],
        'p' => [0, 7, 5, 7, 4],
        'r' => [0, 7, 4, 4, 4],
        's' => [0, 7, 6, 3, 7],
        't' => [2, 7, 2, 2, 3],
        'v' => [0, 5, 5, 5, 2],
        ' ' => [0, 0, 0, 0, 0],
        _ => return None,
    })
}

struct Canvas {
    /// (H, W) palette indices
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: u8) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            self.px[y as usize * W + x as usize] = c;
        }
    }
    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: u8) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.set(x, y, c);
            }
        }
    }
    /// Bresenham, 2 px thick.
    fn line(&mut self, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), c: u8) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let mut err = dx + dy;
        loop {
            self.rect(x0, y0, x0 + 1, y0 + 1, c);
            if x0 == x1 && y0 == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }
    /// Text at scale 2 (each glyph 6×10 px, 8 px advance); unknown characters are skipped.
    fn text(&mut self, x: i64, y: i64, s: &str, c: u8) {
        let mut cx = x;
        for ch in s.chars() {
            if let Some(g) = glyph(ch) {
                for (row, bits) in g.iter().enumerate() {
                    for col in 0..3 {
                        if bits >> (2 - col) & 1 == 1 {
                            let (px, py) = (cx + 2 * col as i64, y + 2 * row as i64);
                            self.rect(px, py, px + 1, py + 1, c);
                        }
                    }
                }
            }
            cx += 8;
        }
    }
}

fn text_width(s: &str) -> i64 {
    8 * s.chars().count() as i64
}

/// Tick label: integer when whole, else up to 3 significant decimals.
fn label(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e9 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Renders the train loss (blue line) and eval loss (red line with square markers) against
/// the optimizer step.
pub fn render(history: &History) -> Vec<u8> {
    let mut cv = Canvas {
        px: vec![WHITE; W * H],
    };
    let train: Vec<(f64, f64)> = history
        .steps
        .iter()
        .filter(|r| r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss))
        .collect();
    let eval: Vec<(f64, f64)> = history
        .evals
        .iter()
        .filter(|r| r.eval_loss.is_finite())
        .map(|r| (r.step as f64, r.eval_loss))
        .collect();
    let all = train.iter().chain(&eval);
    let xmax = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let (mut ymin, mut ymax) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.1), b.max(p.1))
    });
    if !ymin.is_finite() {
        (ymin, ymax) = (0.0, 1.0);
    }
    let pad = ((ymax - ymin) * 0.05).max(1e-3);
    let (ymin, ymax) = ((ymin - pad).max(0.0), ymax + pad);
    let to_px = |(x, y): (f64, f64)| -> (i64, i64) {
        let px = L as f64 + x / xmax * (R - L) as f64;
        let py = B as f64 - (y - ymin) / (ymax - ymin) * (B - T) as f64;
        (px.round() as i64, py.round() as i64)
    };
    // grid and tick labels
    for k in 0..=4 {
        let fy = ymin + (ymax - ymin) * k as f64 / 4.0;
        let (_, py) = to_px((0.0, fy));
        cv.rect(L as i64, py, R as i64, py, GRID);
        let s = label(fy);
        cv.text(L as i64 - 8 - text_width(&s), py - 5, &s, INK);
    }
    // Step ticks at multiples of a round step (1, 2 or 5 × 10^k), about four of them: quarters
    // of the last step (e.g. 59.25 of 79) read as arbitrary labels.
    let xstep = nice_step(xmax / 4.0);
    for k in 0..=(xmax / xstep).floor() as i64 {
        let fx = k as f64 * xstep;
        let (px, _) = to_px((fx, ymin));
        cv.rect(px, T as i64, px, B as i64, GRID);
        let s = label(fx);
        cv.text(px - text_width(&s) / 2, B as i64 + 10, &s, INK);
    }
    cv.rect(L as i64, T as i64, L as i64 + 1, B as i64, INK);
    cv.rect(L as i64, B as i64, R as i64, B as i64 + 1, INK);
    for w in train.windows(2) {
        cv.line(to_px(w[0]), to_px(w[1]), TRAIN);
    }
    if let [p] = train.as_slice() {
        let (x, y) = to_px(*p);
        cv.rect(x - 2, y - 2, x + 2, y + 2, TRAIN);
    }
    for w in eval.windows(2) {
        cv.line(to_px(w[0]), to_px(w[1]), EVAL);
    }
    for &p in &eval {
        let (x, y) = to_px(p);
        cv.rect(x - 3, y - 3, x + 3, y + 3, EVAL);
    }
    // legend and axis names
    let lx = R as i64 - 150;
    cv.rect(lx, 12, lx + 20, 14, TRAIN);
    cv.text(lx + 26, 8, "train", INK);
    cv.rect(lx + 80, 10, lx + 86, 16, EVAL);
    cv.text(lx + 92, 8, "eval", INK);
    cv.text(8, 8, "loss", INK);
    cv.text(R as i64 - text_width("step"), H as i64 - 14, "step", INK);
    encode_png(&cv.px, W, H, &PALETTE)
}

/// The smallest of 1, 2, 5 × 10^k (k ≥ 0: steps are whole) that is ≥ `raw`.
fn nice_step(raw: f64) -> f64 {
    let mut p = 1.0;
    loop {
        for m in [1.0, 2.0, 5.0] {
            if m * p >= raw {
                return m * p;
            }
        }
        p *= 10.0;
    }
}

/// Writes [`render`]'s PNG to `path` atomically (temp file + rename).
pub fn write(history: &History, path: &Path) -> Result<()> {
    let png = render(history);
    let tmp = path.with_extension("png.tmp");
    std::fs::write(&tmp, png).map_err(|e| TrainerError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainerError::io(path, e))
}

fn crc32(bytes: &[u8]) -> u32 {
    // IEEE 802.3 CRC (reflected polynomial 0xEDB88320), as PNG chunks use.
    let mut table = [0u32; 256];
    for (n, t) in table.iter_mut().enumerate() {
        let mut c = n as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    !bytes.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in bytes.chunks(5552) {
        for &x in chunk {
            a += x as u32;
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

/// LSB-first bit writer of a deflate stream.
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    /// `value`'s low `len` bits, least significant first (deflate's extra bits and headers).
    fn put(&mut self, value: u32, len: u32) {
        self.acc |= (value as u64) << self.n;
        self.n += len;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    /// A Huffman code: `len` bits, most significant first (RFC 1951 §3.1.1).
    fn code(&mut self, code: u32, len: u32) {
        let rev = code.reverse_bits() >> (32 - len);
        self.put(rev, len);
    }
    /// Fixed literal/length code of `sym` (0..=285, RFC 1951 §3.2.6).
    fn sym(&mut self, sym: u32) {
        match sym {
            0..=143 => self.code(0x30 + sym, 8),
            144..=255 => self.code(0x190 + sym - 144, 9),
            256..=279 => self.code(sym - 256, 7),
            _ => self.code(0xC0 + sym - 280, 8),
        }
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// Base match length of length codes 257..=285 and their extra bits.
const LEN_BASE: [u32; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u32; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];

/// Raw deflate of `data`: one final fixed-Huffman block where every run of a repeated byte is
/// the byte once followed by matches of distance 1 (length 3..=258).
fn deflate_rle(data: &[u8]) -> Vec<u8> {
    let mut w = Bits {
        out: Vec::new(),
        acc: 0,
        n: 0,
    };
    w.put(1, 1); // BFINAL
    w.put(1, 2); // BTYPE = 01, fixed Huffman
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        w.sym(b as u32);
        let mut run = data[i + 1..].iter().take_while(|&&x| x == b).count();
        i += 1 + run;
        while run >= 3 {
            // Leave at least 3 for the next match, or none.
            let len = if run > 258 && run - 258 < 3 {
                run - 3
            } else {
                run.min(258)
            } as u32;
            let k = LEN_BASE
                .iter()
                .rposition(|&base| base <= len)
                .expect("len >= 3");
            w.sym(257 + k as u32);
            w.put(len - LEN_BASE[k], LEN_EXTRA[k]);
            w.code(0, 5); // distance code 0 = distance 1
            run -= len as usize;
        }
        for _ in 0..run {
            w.sym(b as u32);
        }
    }
    w.sym(256); // end of block
    w.finish()
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend(kind);
    out.extend(data);
    let crc = crc32(&out[start..]);
    out.extend(crc.to_be_bytes());
}

/// An 8-bit indexed-colour PNG of `px (h, w)` palette indices.
pub fn encode_png(px: &[u8], w: usize, h: usize, palette: &[[u8; 3]]) -> Vec<u8> {
    assert_eq!(px.len(), w * h);
    // Raw scanlines, each prefixed with filter type 0 (None).
    let mut raw = Vec::with_capacity(h * (w + 1));
    for row in px.chunks(w) {
        raw.push(0);
        raw.extend(row);
    }
    // zlib: CMF/FLG (deflate, 32 KiB window, no dict, check bits), one fixed-Huffman block.
    let mut z = vec![0x78, 0x01];
    z.extend(deflate_rle(&raw));
    z.extend(adler32(&raw).to_be_bytes());
    let mut out = vec![0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
    let mut ihdr = Vec::new();
    ihdr.extend((w as u32).to_be_bytes());
    ihdr.extend((h as u32).to_be_bytes());
    ihdr.extend([8, 3, 0, 0, 0]); // bit depth 8, colour type 3 (palette), deflate, filter 0, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"PLTE", &palette.concat());
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn step_ticks_are_round_numbers() {
        assert_eq!(nice_step(79.0 / 4.0), 20.0);
        assert_eq!(nice_step(560.0 / 4.0), 200.0);
        assert_eq!(nice_step(8.0 / 4.0), 2.0);
        assert_eq!(nice_step(0.25), 1.0);
        assert_eq!(nice_step(3.0), 5.0);
    }

    use super::*;

    /// Inflates the subset `deflate_rle` writes (one fixed-Huffman block; RFC 1951 §3.2.6
    /// decoding tables written out independently of the encoder's).
    fn inflate_fixed(z: &[u8]) -> Vec<u8> {
        let mut pos = 0usize;
        let mut bit = |n: u32| -> u32 {
            let mut v = 0;
            for k in 0..n {
                let b = (z[pos / 8] >> (pos % 8)) & 1;
                v |= (b as u32) << k;
                pos += 1;
            }
            v
        };
        assert_eq!((bit(1), bit(2)), (1, 1), "final fixed block");
        let mut out: Vec<u8> = Vec::new();
        loop {
            // Read a Huffman code MSB-first, growing from 7 to 9 bits.
            let mut code = 0u32;
            for _ in 0..7 {
                code = code << 1 | bit(1);
            }
            let sym = if code <= 0x17 {
                code + 256
            } else {
                code = code << 1 | bit(1);
                if (0x30..=0xBF).contains(&code) {
                    code - 0x30
                } else if (0xC0..=0xC7).contains(&code) {
                    code - 0xC0 + 280
                } else {
                    code = code << 1 | bit(1);
                    code - 0x190 + 144
                }
            };
            match sym {
                0..=255 => out.push(sym as u8),
                256 => return out,
                _ => {
                    let k = (sym - 257) as usize;
                    let len = LEN_BASE[k] + bit(LEN_EXTRA[k]);
                    let mut d = 0;
                    for _ in 0..5 {
                        d = d << 1 | bit(1);
                    }
                    assert_eq!(d, 0, "distance code 0 (distance 1)");
                    for _ in 0..len {
                        out.push(*out.last().unwrap());
                    }
                }
            }
        }
    }

    #[test]
    fn rle_deflate_round_trips() {
        let mut data = Vec::new();
        for (b, n) in [
            (0u8, 1usize),
            (7, 2),
            (7, 0),
            (200, 3),
            (1, 4),
            (255, 258),
            (3, 259),
            (4, 260),
            (5, 261),
            (6, 262),
            (9, 516),
            (10, 1000),
            (143, 5),
            (144, 5),
        ] {
            data.extend(std::iter::repeat_n(b, n));
        }
        data.extend((0..=255u8).cycle().take(700));
        assert_eq!(inflate_fixed(&deflate_rle(&data)), data);
        let png = render(&History::default());
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }

    #[test]
    fn crc_and_adler_match_known_values() {
        // Standard check values of the two checksums.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }
}
