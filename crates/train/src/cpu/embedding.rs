//! Token embedding: fwd `out[i] = table[ids[i]]`; bwd (only when `embed_tokens` is trained as a
//! modules_to_save copy) `d_table[ids[i]] += d_out[i]`. Ids are validated by the caller.

use rayon::prelude::*;

use super::Real;

/// `out (N, C)` from `table (V, C)`.
pub fn fwd<T: Real>(out: &mut [T], ids: &[u32], table: &[T], c: usize) {
    assert_eq!(out.len(), ids.len() * c);
    out.par_chunks_mut(c).zip(ids).for_each(|(o, &id)| {
        let id = id as usize;
        o.copy_from_slice(&table[id * c..(id + 1) * c]);
    });
}

/// `d_table (V, C) += scatter(d_out (N, C))`. Serial: rows may repeat.
pub fn bwd_acc<T: Real>(d_table: &mut [T], ids: &[u32], d_out: &[T], c: usize) {
    for (i, &id) in ids.iter().enumerate() {
        let id = id as usize;
        for (d, &g) in d_table[id * c..(id + 1) * c]
            .iter_mut()
            .zip(&d_out[i * c..(i + 1) * c])
        {
            *d = *d + g;
        }
    }
}
