//! Tensor-name mapping and the Q/K row permutation, against hand-derived expectations.

use qlora_gguf::hf::{hf_name, permute_rows, unpermute_rows};

#[test]
fn permutation_matches_llama_cpp_reshape_swapaxes() {
    // llama.cpp: w.reshape(n_head, 2, D/2, cols).swapaxes(1, 2).reshape(rows, cols).
    // rows = 8, n_head = 2, D = 4, one column holding the HF row index. Element [h, i, j] of the
    // reshape is HF row 4h + 2i + j; after swapaxes it sits at [h, j, i], i.e. flat row
    // 4h + 2j + i. So GGUF rows 0..8 hold HF rows
    //   h=0: (j,i) = (0,0) → 0, (0,1) → 2, (1,0) → 1, (1,1) → 3
    //   h=1: 4, 6, 5, 7.
    let hf: Vec<f32> = (0..8).map(|r| r as f32).collect();
    let gguf = permute_rows(&hf, 8, 1, 2);
    assert_eq!(gguf, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    assert_eq!(unpermute_rows(&gguf, 8, 1, 2), hf);

    // With 3 columns and one head of D = 6: GGUF row order is HF rows 0, 3, 1, 4, 2, 5, each
    // row moved whole.
    let hf: Vec<f32> = (0..18).map(|x| x as f32).collect();
    let gguf = permute_rows(&hf, 6, 3, 1);
    let rows: Vec<f32> = gguf.chunks(3).map(|r| r[0] / 3.0).collect();
    assert_eq!(rows, vec![0., 3., 1., 4., 2., 5.]);
    assert!(gguf
        .chunks(3)
        .all(|r| r[1] == r[0] + 1.0 && r[2] == r[0] + 2.0));
    assert_eq!(unpermute_rows(&gguf, 6, 3, 1), hf);
}

#[test]
fn tensor_names() {
    for (g, h) in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        (
            "blk.0.attn_norm.weight",
            "model.layers.0.input_layernorm.weight",
        ),
        (
            "blk.12.ffn_norm.weight",
            "model.layers.12.post_attention_layernorm.weight",
        ),
        (
            "blk.3.attn_q.weight",
            "model.layers.3.self_attn.q_proj.weight",
        ),
        (
            "blk.3.attn_k.weight",
            "model.layers.3.self_attn.k_proj.weight",
        ),
        (
            "blk.3.attn_v.weight",
            "model.layers.3.self_attn.v_proj.weight",
        ),
        (
            "blk.3.attn_output.weight",
            "model.layers.3.self_attn.o_proj.weight",
        ),
        ("blk.3.attn_q.bias", "model.layers.3.self_attn.q_proj.bias"),
        (
            "blk.29.ffn_gate.weight",
            "model.layers.29.mlp.gate_proj.weight",
        ),
        ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
        (
            "blk.29.ffn_down.weight",
            "model.layers.29.mlp.down_proj.weight",
        ),
    ] {
        assert_eq!(hf_name(g).as_deref(), Some(h), "{g}");
    }
    for g in [
        "rope_freqs.weight",
        "blk.0.ffn_gate_exps.weight",
        "blk.x.attn_q.weight",
        "blk.0.attn_norm.bias",
        "blk.0.ffn_up.bias",
        "blk.0.attn_q.scale",
        "output_norm.bias",
    ] {
        assert_eq!(hf_name(g), None, "{g}");
    }
}
