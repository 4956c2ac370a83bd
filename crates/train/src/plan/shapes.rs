//! Named model shapes for `qlora memory` and `qlora bench`: the `config.json` of each public
//! checkpoint (the keys that fix the shapes), parsed by [`ModelConfig::from_json_str`] like any
//! model directory, so nothing here bypasses the config validation.

use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{Result, TrainError};

/// `(name, config.json)`; the values are those of the Hugging Face repositories named.
pub const SHAPES: [(&str, &str); 6] = [
    // meta-llama/Llama-2-7b-hf
    (
        "llama2-7b",
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":4096,
        "intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,
        "num_key_value_heads":32,"vocab_size":32000,"max_position_embeddings":4096,
        "rms_norm_eps":1e-05,"rope_theta":10000.0,"tie_word_embeddings":false,
        "hidden_act":"silu","torch_dtype":"float16"}"#,
    ),
    // meta-llama/Meta-Llama-3-8B
    (
        "llama3-8b",
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":4096,
        "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,
        "num_key_value_heads":8,"vocab_size":128256,"max_position_embeddings":8192,
        "rms_norm_eps":1e-05,"rope_theta":500000.0,"tie_word_embeddings":false,
        "hidden_act":"silu","torch_dtype":"bfloat16"}"#,
    ),
    // mistralai/Mistral-7B-v0.3 (sliding_window null)
    (
        "mistral-7b",
        r#"{"architectures":["MistralForCausalLM"],"model_type":"mistral","hidden_size":4096,
        "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,
        "num_key_value_heads":8,"vocab_size":32768,"max_position_embeddings":32768,
        "rms_norm_eps":1e-05,"rope_theta":1000000.0,"sliding_window":null,
        "tie_word_embeddings":false,"hidden_act":"silu","torch_dtype":"bfloat16"}"#,
    ),
    // Qwen/Qwen2.5-7B (q/k/v biases; use_sliding_window false)
    (
        "qwen2.5-7b",
        r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","hidden_size":3584,
        "intermediate_size":18944,"num_hidden_layers":28,"num_attention_heads":28,
        "num_key_value_heads":4,"vocab_size":152064,"max_position_embeddings":131072,
        "rms_norm_eps":1e-06,"rope_theta":1000000.0,"sliding_window":131072,
        "use_sliding_window":false,"tie_word_embeddings":false,"hidden_act":"silu",
        "torch_dtype":"bfloat16"}"#,
    ),
    // meta-llama/Meta-Llama-3-70B
    (
        "llama3-70b",
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":8192,
        "intermediate_size":28672,"num_hidden_layers":80,"num_attention_heads":64,
        "num_key_value_heads":8,"vocab_size":128256,"max_position_embeddings":8192,
        "rms_norm_eps":1e-05,"rope_theta":500000.0,"tie_word_embeddings":false,
        "hidden_act":"silu","torch_dtype":"bfloat16"}"#,
    ),
    // The bundled test model (tests/fixtures/tiny-llama/config.json).
    (
        "tiny",
        include_str!("../../../../tests/fixtures/tiny-llama/config.json"),
    ),
];

/// The names [`shape`] accepts.
pub fn shape_names() -> Vec<&'static str> {
    SHAPES.iter().map(|(n, _)| *n).collect()
}

/// The config of a named shape.
pub fn shape(name: &str) -> Result<ModelConfig> {
    match SHAPES.iter().find(|(n, _)| *n == name) {
        Some((n, json)) => ModelConfig::from_json_str(json, Path::new(&format!("<shape {n}>"))),
        None => Err(TrainError::config(
            "--shape",
            name,
            format!("is not a known shape (known: {})", shape_names().join(", ")),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_parses_with_its_published_sizes() {
        let l3 = shape("llama3-8b").unwrap();
        assert_eq!(
            (l3.hidden_size, l3.num_kv_heads, l3.head_dim, l3.vocab_size),
            (4096, 8, 128, 128256)
        );
        // Llama-3-8B has 8.03 B parameters as transformers counts them.
        assert_eq!(l3.base_param_count(), 8_030_261_248);
        assert_eq!(
            shape("llama2-7b").unwrap().base_param_count(),
            6_738_415_616
        );
        let q = shape("qwen2.5-7b").unwrap();
        assert!(q.qkv_bias && q.head_dim == 128);
        assert_eq!(q.base_param_count(), 7_615_616_512);
        assert_eq!(
            shape("mistral-7b").unwrap().base_param_count(),
            7_248_023_552
        );
        assert_eq!(
            shape("llama3-70b").unwrap().base_param_count(),
            70_553_706_496
        );
        assert_eq!(shape("tiny").unwrap().hidden_size, 64);
        let e = shape("llama9").unwrap_err().to_string();
        assert!(e.contains("llama9") && e.contains("llama3-8b"), "{e}");
    }
}
