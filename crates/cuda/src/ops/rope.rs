//! RoPE (`cuda/rope.cu`) and the host-side inverse frequencies (with llama3 scaling).

use super::{check_float, check_len, check_len_mut, dim_i32, entry};
use crate::device::{cdiv, Args, Device, Elem, Geometry, Stream, View, ViewMut};
use crate::error::{bad_arg, Result};

const FILE: &str = "rope.cu";

/// The `rope_scaling` block of a Llama 3.x config (`rope_type: "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// `inv_freq[i] = 1 / theta^(2i/D)` for i < D/2, as transformers computes it in f32
/// (`1.0 / (base ** (arange(0, dim, 2).float() / dim))`), then llama3 scaling when given
/// (transformers `_compute_llama3_parameters`): wavelengths longer than
/// `orig/low_freq_factor` are divided by `factor`, shorter than `orig/high_freq_factor` kept,
/// and the band between interpolated with `smooth = (orig/wavelen − low)/(high − low)`.
pub fn inv_freq(theta: f32, d: usize, scaling: Option<Llama3Scaling>) -> Vec<f32> {
    let mut f: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32))
        .collect();
    if let Some(s) = scaling {
        let orig = s.original_max_position_embeddings as f32;
        let low_wavelen = orig / s.low_freq_factor;
        let high_wavelen = orig / s.high_freq_factor;
        for v in &mut f {
            let wavelen = 2.0 * std::f32::consts::PI / *v;
            if wavelen > low_wavelen {
                *v /= s.factor;
            } else if wavelen >= high_wavelen {
                let smooth =
                    (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                *v = (1.0 - smooth) * *v / s.factor + smooth * *v;
            }
        }
    }
    f
}

/// One thread per rotated pair: rows·heads·D/2 threads in 256-thread blocks.
pub fn geometry(rows: usize, heads: usize, d: usize) -> Geometry {
    Geometry {
        grid: (cdiv(rows * heads * (d / 2), 256).max(1) as u32, 1, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}

#[allow(clippy::too_many_arguments)]
fn launch<T: Elem>(
    dev: &Device,
    stem: &str,
    op: &str,
    y: &mut ViewMut<'_, T>,
    x: &View<'_, T>,
    pos: &View<'_, i32>,
    inv_freq: &View<'_, f32>,
    rows: usize,
    heads: usize,
    d: usize,
    stream: Option<&Stream>,
) -> Result<()> {
    check_float::<T>(op)?;
    if !d.is_multiple_of(2) {
        return Err(bad_arg(op, "D", format!("head dim {d} must be even")));
    }
    check_len_mut(op, "y", y, rows * heads * d)?;
    check_len(op, "x", x, rows * heads * d)?;
    check_len(op, "pos", pos, rows)?;
    check_len(op, "inv_freq", inv_freq, d / 2)?;
    let args = Args::new()
        .ptr_mut(y)
        .ptr(x)
        .ptr(pos)
        .ptr(inv_freq)
        .arg(rows as i64)
        .arg(dim_i32(op, "heads", heads)?)
        .arg(dim_i32(op, "D", d)?);
    dev.launch(
        FILE,
        &entry::<T>(stem),
        geometry(rows, heads, d),
        args,
        stream,
    )
}

/// Rotate `x` (rows, heads, D) by `pos[row] · inv_freq`; `y` may alias `x`.
#[allow(clippy::too_many_arguments)]
pub fn fwd<T: Elem>(
    dev: &Device,
    y: &mut ViewMut<'_, T>,
    x: &View<'_, T>,
    pos: &View<'_, i32>,
    inv_freq: &View<'_, f32>,
    rows: usize,
    heads: usize,
    d: usize,
    stream: Option<&Stream>,
) -> Result<()> {
    launch(
        dev,
        "qlr_rope_fwd",
        "rope::fwd",
        y,
        x,
        pos,
        inv_freq,
        rows,
        heads,
        d,
        stream,
    )
}
/// The inverse rotation of `dy`; `dx` may alias `dy`.
#[allow(clippy::too_many_arguments)]
pub fn bwd<T: Elem>(
    dev: &Device,
    dx: &mut ViewMut<'_, T>,
    dy: &View<'_, T>,
    pos: &View<'_, i32>,
    inv_freq: &View<'_, f32>,
    rows: usize,
    heads: usize,
    d: usize,
    stream: Option<&Stream>,
) -> Result<()> {
    launch(
        dev,
        "qlr_rope_bwd",
        "rope::bwd",
        dx,
        dy,
        pos,
        inv_freq,
        rows,
        heads,
        d,
        stream,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_inv_freq() {
        let f = inv_freq(10000.0, 16, None);
        assert_eq!(f.len(), 8);
        assert_eq!(f[0], 1.0);
        // 10000^(-2·7/16) computed independently in f64.
        let want = 10000f64.powf(-14.0 / 16.0);
        assert!((f[7] as f64 - want).abs() < 1e-6 * want);
    }

    #[test]
    fn llama3_scaling_bands() {
        let s = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let base = inv_freq(500000.0, 128, None);
        let f = inv_freq(500000.0, 128, Some(s));
        for (b, v) in base.iter().zip(&f) {
            let wl = 2.0 * std::f32::consts::PI / b;
            if wl < 8192.0 / 4.0 {
                assert_eq!(v, b, "high frequencies are kept");
            } else if wl > 8192.0 {
                assert_eq!(*v, b / 8.0, "low frequencies are divided by factor");
            } else {
                assert!(*v <= *b && *v >= b / 8.0, "the band interpolates");
            }
        }
        assert!(f.iter().zip(&base).any(|(v, b)| v != b));
    }

    #[test]
    fn geometry_covers_pairs() {
        let g = geometry(2048, 32, 128);
        assert!(g.grid.0 as usize * 256 >= 2048 * 32 * 64);
        assert_eq!(geometry(1, 1, 2).grid.0, 1);
    }
}
