//! CPU reference of bitsandbytes' blockwise 8-bit AdamW update of one block
//! (`kOptimizerStatic8bit2StateBlockwise<T, ADAM, 256, 1>` in csrc/kernels.cu), the function
//! `cuda/adamw.cu` is checked against:
//! ```text
//! for each element j of the block (≤ 256, valid ones only):
//!   m_j = code_s[c1_j]·absmax_m      v_j = code_u[c2_j]·absmax_v      (dequantize)
//!   (m_j, v_j) = moments(m_j, v_j, g_j·scale)                        (if g_j finite)
//! absmax_m' = max_j |m_j|,  absmax_v' = max_j |v_j|                   (fmaxf from −FLT_MAX)
//! p_j = param(p_j, m_j, v_j)                                         (if g_j finite)
//! c1_j = quantize_m(m_j, absmax_m'),  c2_j = quantize_v(v_j, absmax_v')   (requantize)
//! ```
//! `moments`/`param` are [`crate::adamw`]'s, so the same block routine serves both variants;
//! with [`crate::AdamWVariant::Bnb`] it is bitsandbytes' arithmetic (v's association of the
//! 8-bit kernel). Deviations from bitsandbytes' binary: IEEE `m/absmax` (bnb: `__fdividef`),
//! host-side bias corrections, and a non-finite gradient keeps the element's dequantized m and
//! v (bnb zeroes them); see `crate::adamw`.

use crate::adamw::{moments, param, StepScalars};
use crate::arena::QBLOCK;
use crate::dynamic_map::{quantize_m, quantize_v};

/// The two code books of the 8-bit state.
#[derive(Clone, Debug)]
pub struct Maps {
    /// Signed dynamic map (m).
    pub signed: [f32; 256],
    /// Unsigned dynamic map (v).
    pub unsigned: [f32; 256],
}

impl Default for Maps {
    fn default() -> Self {
        Maps {
            signed: crate::dynamic_map::dynamic_signed(),
            unsigned: crate::dynamic_map::dynamic_unsigned(),
        }
    }
}

/// The 8-bit state of one block.
pub struct BlockState<'a> {
    /// (len,) u8 codes of m into the signed map.
    pub c1: &'a mut [u8],
    /// (len,) u8 codes of v into the unsigned map.
    pub c2: &'a mut [u8],
    /// The block's f32 absmax of m.
    pub absmax_m: &'a mut f32,
    /// The block's f32 absmax of v.
    pub absmax_v: &'a mut f32,
}

/// Updates one block in place. `p`, `g` and the codes have the block's valid length (≤ 256).
/// Returns the number of non-finite gradient elements (left unchanged).
#[inline(always)]
pub fn update_block(
    s: &StepScalars,
    maps: &Maps,
    p: &mut [f32],
    g: &[f32],
    st: BlockState<'_>,
) -> u32 {
    let BlockState {
        c1,
        c2,
        absmax_m,
        absmax_v,
    } = st;
    let n = p.len();
    debug_assert!(n <= QBLOCK && g.len() == n && c1.len() == n && c2.len() == n);
    let mut m = [0f32; QBLOCK];
    let mut v = [0f32; QBLOCK];
    let (old_am, old_av) = (*absmax_m, *absmax_v);
    let mut new_am = -f32::MAX;
    let mut new_av = -f32::MAX;
    let mut bad = 0u32;
    for j in 0..n {
        let m0 = maps.signed[c1[j] as usize] * old_am;
        let v0 = maps.unsigned[c2[j] as usize] * old_av;
        if g[j].is_finite() {
            let (m1, v1) = moments(s, m0, v0, g[j] * s.grad_scale, true);
            m[j] = m1;
            v[j] = v1;
        } else {
            // Unchanged. `+ 0.0` turns the −0 that code 0 · absmax 0 dequantizes to (fresh
            // state) into +0, which requantizes to +0; −0 would hit bnb's sign fix and move to
            // the code below zero.
            m[j] = m0 + 0.0;
            v[j] = v0;
            bad += 1;
        }
        new_am = new_am.max(m[j].abs());
        new_av = new_av.max(v[j].abs());
    }
    for j in 0..n {
        if g[j].is_finite() {
            p[j] = param(s, p[j], m[j], v[j]);
        }
        c1[j] = quantize_m(&maps.signed, m[j], new_am);
        c2[j] = quantize_v(&maps.unsigned, v[j], new_av);
    }
    *absmax_m = new_am;
    *absmax_v = new_av;
    bad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adamw::{AdamWConfig, AdamWVariant};

    fn bs<'a>(
        c1: &'a mut [u8],
        c2: &'a mut [u8],
        am: &'a mut f32,
        av: &'a mut f32,
    ) -> BlockState<'a> {
        BlockState {
            c1,
            c2,
            absmax_m: am,
            absmax_v: av,
        }
    }

    fn bnb(lr: f64, wd: f64) -> AdamWConfig {
        AdamWConfig {
            lr,
            weight_decay: wd,
            variant: AdamWVariant::Bnb,
            ..Default::default()
        }
    }

    #[test]
    fn first_step_by_hand() {
        // Zero state, g = (+a, −a/2, 0, ...): after step 1 m = 0.1·g, so absmax_m = 0.1·a and the
        // codes are exactly +1.0 (255), the code nearest −0.5, and 0; v = 0.001·g²,
        // absmax_v = 0.001·a², codes 255 and nearest 0.25. The parameter moves by
        // −lr·c2/c1 · m/(sqrt(v) + eps·c2) = −lr·sign(g) (up to eps) for the non-zero ones.
        let cfg = bnb(0.01, 0.0);
        let s = StepScalars::new(&cfg, 1, cfg.lr, 1.0);
        let maps = Maps::default();
        let a = 0.5f32;
        let g = [a, -a / 2.0, 0.0];
        let mut p = [1.0f32, 1.0, 1.0];
        let (mut c1, mut c2) = ([0u8; 3], [0u8; 3]);
        let (mut am, mut av) = (0f32, 0f32);
        assert_eq!(
            update_block(
                &s,
                &maps,
                &mut p,
                &g,
                bs(&mut c1, &mut c2, &mut am, &mut av)
            ),
            0
        );
        assert_eq!(am, (1.0f32 - 0.9) * a);
        assert_eq!(av, ((1.0f32 - 0.999) * a) * a);
        assert_eq!(c1[0], 255);
        assert_eq!(c2[0], 255);
        let nearest = |code: &[f32; 256], x: f32| {
            (0..256)
                .min_by(|&i, &j| (code[i] - x).abs().total_cmp(&(code[j] - x).abs()))
                .unwrap() as u8
        };
        assert_eq!(c1[1], nearest(&maps.signed, -0.5));
        assert_eq!(c2[1], nearest(&maps.unsigned, 0.25));
        assert_eq!(maps.signed[c1[2] as usize], 0.0);
        assert_eq!(maps.unsigned[c2[2] as usize], 0.0);
        assert!(
            (p[0] - 0.99).abs() < 1e-6 && (p[1] - 1.01).abs() < 1e-6,
            "{p:?}"
        );
        assert_eq!(p[2], 1.0);
    }

    #[test]
    fn matches_f32_math_on_the_dequantized_state() {
        // The block update equals: dequantize, the 32-bit element math (8-bit association of v),
        // requantize. Recompute that independently and compare everything bit for bit.
        let cfg = bnb(3e-3, 0.01);
        let maps = Maps::default();
        let n = 200;
        let mut rng = 0x1234_5678u64;
        let mut rnd = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            ((rng >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let mut p: Vec<f32> = (0..n).map(|_| rnd()).collect();
        let mut c1: Vec<u8> = (0..n).map(|_| (rnd().abs() * 255.0) as u8).collect();
        let mut c2: Vec<u8> = (0..n).map(|_| (rnd().abs() * 255.0) as u8).collect();
        let (mut am, mut av) = (0.02f32, 3e-4f32);
        let g: Vec<f32> = (0..n).map(|_| rnd() * 0.1).collect();
        let s = StepScalars::new(&cfg, 7, cfg.lr, 1.0);
        // independent recomputation
        let mut want_p = p.clone();
        let mut m = vec![0f32; n];
        let mut v = vec![0f32; n];
        for j in 0..n {
            let gj = g[j];
            m[j] = maps.signed[c1[j] as usize] * am * s.beta1 + s.one_minus_beta1 * gj;
            v[j] = maps.unsigned[c2[j] as usize] * av * s.beta2 + (s.one_minus_beta2 * gj) * gj;
        }
        let nam = m.iter().fold(0f32, |a, x| a.max(x.abs()));
        let nav = v.iter().fold(0f32, |a, x| a.max(x.abs()));
        for j in 0..n {
            want_p[j] = (want_p[j] + s.step_size * (m[j] / (v[j].sqrt() + s.eps))) * s.wd_factor;
        }
        update_block(
            &s,
            &maps,
            &mut p,
            &g,
            bs(&mut c1, &mut c2, &mut am, &mut av),
        );
        assert_eq!(am, nam);
        assert_eq!(av, nav);
        assert_eq!(p, want_p);
        // requantized values are within half a code step of the exact moments
        for j in 0..n {
            let mq = maps.signed[c1[j] as usize] * am;
            let vq = maps.unsigned[c2[j] as usize] * av;
            assert!((mq - m[j]).abs() <= 0.02 * am, "m[{j}]");
            assert!((vq - v[j]).abs() <= 0.02 * av + 1e-12, "v[{j}]");
            assert!(mq == 0.0 || mq.is_sign_negative() == m[j].is_sign_negative());
        }
    }

    #[test]
    fn nonfinite_element_keeps_parameter_and_dequantized_state() {
        let cfg = bnb(1e-3, 0.0);
        let maps = Maps::default();
        let s = StepScalars::new(&cfg, 2, cfg.lr, 1.0);
        // absmax unchanged by the update of the finite element (it only shrinks it) when the
        // non-finite one holds the block's largest moments: they stay exactly representable.
        let mut p = [0.5f32, -0.25];
        let g = [f32::NAN, 1e-6];
        let (mut c1, mut c2) = ([255u8, 127], [255u8, 0]);
        let (mut am, mut av) = (0.1f32, 0.01f32);
        let bad = update_block(
            &s,
            &maps,
            &mut p,
            &g,
            bs(&mut c1, &mut c2, &mut am, &mut av),
        );
        assert_eq!(bad, 1);
        assert_eq!(p[0], 0.5);
        assert_eq!((am, av), (0.1, 0.01));
        assert_eq!((c1[0], c2[0]), (255, 255));
        assert_ne!(p[1], -0.25);
    }
}
