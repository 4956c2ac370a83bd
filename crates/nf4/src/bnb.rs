//! The transformers bitsandbytes 4-bit checkpoint format (specs/nf4.md §5): tensor keys around
//! each quantized `<module>.weight`, the quant-state JSON, and `quantization_config`.

use crate::codebook::{DYNAMIC_SIGNED, NF4};
use crate::quant::{check_blocksize, NESTED_BLOCKSIZE};
use crate::st::{ModelWeights, OwnedTensor};
use crate::{to_f32, Absmax, Dtype, Nf4Error, Nf4Tensor, QuantState, Result};
use serde_json::{json, Value};

/// Suffix of the tensor holding the quant-state JSON of an NF4 weight.
pub const QUANT_STATE_NF4: &str = "quant_state.bitsandbytes__nf4";
const QUANT_STATE_FP4: &str = "quant_state.bitsandbytes__fp4";

/// Every extra key a 4-bit weight `W` brings: `W.absmax`, `W.quant_map`, … .
pub const NF4_SIDE_SUFFIXES: [&str; 5] = [
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    QUANT_STATE_NF4,
];

/// Is `name` one of the side tensors of a 4-bit weight (`<module>.weight.absmax`, …)?
pub fn is_nf4_side_tensor(name: &str) -> bool {
    NF4_SIDE_SUFFIXES.iter().any(|suf| {
        name.strip_suffix(suf)
            .is_some_and(|rest| rest.ends_with(".weight."))
    })
}

/// Python's `repr(float)`: the shortest decimal that round-trips, in exponent form below 1e-4
/// and from 1e16 on, with at least two exponent digits — what `json.dumps` writes for the
/// quant state's `nested_offset` (an f32 widened to a Python float).
pub fn python_float_repr(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let a = x.abs();
    if (1e-4..1e16).contains(&a) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        // Rust's `{:e}` is also shortest round-trip: "3.0000000095132306e-30" or "1e-5".
        let s = format!("{x:e}");
        let (mant, exp) = s.split_once('e').expect("exponent form");
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        format!("{mant}e{sign}{digits:0>2}")
    }
}

/// The quant-state JSON exactly as bitsandbytes serializes it (Python's default separators and
/// key order; `nested_*` only with double quantization).
pub fn quant_state_json(state: &QuantState) -> String {
    let shape: Vec<String> = state.shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        state.blocksize,
        state.dtype.torch_name(),
        shape.join(", ")
    );
    if let Absmax::Double { offset, .. } = &state.absmax {
        s += &format!(", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}", python_float_repr(*offset as f64));
    }
    s.push('}');
    s
}

/// The tensors a transformers 4-bit checkpoint stores for one quantized weight named
/// `weight_name` (e.g. `model.layers.0.mlp.down_proj.weight`).
pub fn nf4_checkpoint_tensors(weight_name: &str, t: &Nf4Tensor) -> Vec<OwnedTensor> {
    let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut out = vec![(
        weight_name.to_string(),
        Dtype::U8,
        vec![t.packed.len(), 1],
        t.packed.clone(),
    )];
    match &t.state.absmax {
        Absmax::F32(a) => out.push((
            format!("{weight_name}.absmax"),
            Dtype::F32,
            vec![a.len()],
            f32_bytes(a),
        )),
        Absmax::Double {
            codes,
            nested_absmax,
            ..
        } => {
            out.push((
                format!("{weight_name}.absmax"),
                Dtype::U8,
                vec![codes.len()],
                codes.clone(),
            ));
            out.push((
                format!("{weight_name}.nested_absmax"),
                Dtype::F32,
                vec![nested_absmax.len()],
                f32_bytes(nested_absmax),
            ));
            out.push((
                format!("{weight_name}.nested_quant_map"),
                Dtype::F32,
                vec![256],
                f32_bytes(&DYNAMIC_SIGNED),
            ));
        }
    }
    out.push((
        format!("{weight_name}.quant_map"),
        Dtype::F32,
        vec![16],
        f32_bytes(&NF4),
    ));
    let js = quant_state_json(&t.state).into_bytes();
    out.push((
        format!("{weight_name}.{QUANT_STATE_NF4}"),
        Dtype::U8,
        vec![js.len()],
        js,
    ));
    out
}

/// The `quantization_config` block of `config.json` for the QLoRA recipe.
pub fn quantization_config(
    compute_dtype: Dtype,
    double_quant: bool,
    skip_modules: &[String],
) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype.torch_name(),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": if skip_modules.is_empty() { Value::Null } else { json!(skip_modules) },
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

impl ModelWeights {
    /// Is `weight_name` stored as a bitsandbytes 4-bit NF4 weight?
    pub fn is_nf4(&self, weight_name: &str) -> bool {
        self.contains(&format!("{weight_name}.{QUANT_STATE_NF4}"))
    }

    /// Any bitsandbytes 4-bit weight in the checkpoint (NF4 or FP4)?
    pub fn has_bnb4(&self) -> bool {
        self.names()
            .iter()
            .any(|n| n.ends_with(QUANT_STATE_NF4) || n.ends_with(QUANT_STATE_FP4))
    }

    /// Load a bitsandbytes 4-bit weight by name, validating every side tensor against the
    /// quant-state JSON (which is the only place the logical shape and blocksize live).
    pub fn get_nf4(&self, weight_name: &str) -> Result<Nf4Tensor> {
        let file = self.file_of(weight_name)?.path.clone();
        let bad = |reason: String| Nf4Error::BadStoredTensor {
            path: file.clone(),
            tensor: weight_name.into(),
            reason,
        };
        if self.contains(&format!("{weight_name}.{QUANT_STATE_FP4}")) {
            return Err(bad("is quantized as FP4; only NF4 is supported".into()));
        }
        let qs_name = format!("{weight_name}.{QUANT_STATE_NF4}");
        if !self.contains(&qs_name) {
            return Err(bad(format!("is not a 4-bit weight (no `{qs_name}`)")));
        }
        let qs: Value = serde_json::from_slice(self.bytes(&qs_name)?)
            .map_err(|e| bad(format!("quant state is not JSON: {e}")))?;
        let field = |k: &str| {
            qs.get(k)
                .ok_or_else(|| bad(format!("quant state has no `{k}`")))
        };
        if field("quant_type")?.as_str() != Some("nf4") {
            return Err(bad(format!(
                "quant_type {} is not nf4",
                field("quant_type")?
            )));
        }
        let blocksize = field("blocksize")?
            .as_u64()
            .ok_or_else(|| bad("blocksize is not an integer".into()))?
            as usize;
        check_blocksize(blocksize).map_err(|e| bad(e.to_string()))?;
        let dtype_s = field("dtype")?.as_str().unwrap_or_default();
        let dtype = Dtype::from_torch_name(dtype_s)
            .filter(|d| d.is_float16_or_32())
            .ok_or_else(|| bad(format!("unsupported quant-state dtype `{dtype_s}`")))?;
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .ok_or_else(|| bad("shape is not a list".into()))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|d| d as usize)
                    .ok_or_else(|| bad("shape entries must be integers".into()))
            })
            .collect::<Result<_>>()?;
        let numel: usize = shape.iter().product();

        // The packed codes: U8, or (FSDP-QLoRA) the same bytes viewed as bf16/f16/f32 — never
        // converted, only reinterpreted.
        let info = self.tensor_info(weight_name)?;
        let packed = self.bytes(weight_name)?.to_vec();
        if packed.len() != numel.div_ceil(2) {
            return Err(bad(format!(
                "packed weight has {} bytes ({:?} {}), quant-state shape {shape:?} needs {}",
                packed.len(),
                info.shape,
                info.dtype.safetensors_name(),
                numel.div_ceil(2)
            )));
        }

        let f32_of = |name: &str, want_len: usize| -> Result<Vec<f32>> {
            let full = format!("{weight_name}.{name}");
            let (d, _) = self
                .info(&full)
                .map_err(|_| bad(format!("missing `{full}`")))?;
            let v = to_f32(d, self.bytes(&full)?)
                .filter(|_| d == Dtype::F32)
                .ok_or_else(|| bad(format!("`{full}` must be F32")))?;
            if v.len() != want_len {
                return Err(bad(format!(
                    "`{full}` has {} entries, expected {want_len}",
                    v.len()
                )));
            }
            Ok(v)
        };
        let quant_map = f32_of("quant_map", 16)?;
        if quant_map
            .iter()
            .zip(NF4)
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(bad("quant_map is not the NF4 code book".into()));
        }
        let n_blocks = numel.div_ceil(blocksize);
        let absmax = if qs.get("nested_offset").is_some() {
            let offset = field("nested_offset")?
                .as_f64()
                .ok_or_else(|| bad("nested_offset is not a number".into()))?
                as f32;
            let nb = field("nested_blocksize")?.as_u64();
            if nb != Some(NESTED_BLOCKSIZE as u64) {
                return Err(bad(format!(
                    "nested_blocksize {nb:?} is not supported (only 256)"
                )));
            }
            let nested_map = f32_of("nested_quant_map", 256)?;
            if nested_map
                .iter()
                .zip(DYNAMIC_SIGNED)
                .any(|(a, b)| a.to_bits() != b.to_bits())
            {
                return Err(bad(
                    "nested_quant_map is not bitsandbytes' signed dynamic map".into(),
                ));
            }
            let codes_name = format!("{weight_name}.absmax");
            let (d, _) = self
                .info(&codes_name)
                .map_err(|_| bad(format!("missing `{codes_name}`")))?;
            if d != Dtype::U8 {
                return Err(bad(format!(
                    "`{codes_name}` must be U8 with double quantization"
                )));
            }
            let codes = self.bytes(&codes_name)?.to_vec();
            if codes.len() != n_blocks {
                return Err(bad(format!(
                    "`{codes_name}` has {} entries, expected {n_blocks}",
                    codes.len()
                )));
            }
            let nested_absmax = f32_of("nested_absmax", n_blocks.div_ceil(NESTED_BLOCKSIZE))?;
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
            }
        } else {
            Absmax::F32(f32_of("absmax", n_blocks)?)
        };
        let state = QuantState {
            shape,
            blocksize,
            dtype,
            absmax,
        };
        state.validate(weight_name)?;
        Ok(Nf4Tensor { packed, state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_tensors_of_4bit_weights() {
        assert!(is_nf4_side_tensor(
            "model.layers.0.mlp.up_proj.weight.absmax"
        ));
        assert!(is_nf4_side_tensor("m.weight.quant_state.bitsandbytes__nf4"));
        assert!(!is_nf4_side_tensor("model.layers.0.mlp.up_proj.weight"));
        assert!(!is_nf4_side_tensor("model.norm.absmax"));
        assert!(!is_nf4_side_tensor("lm_head.weight"));
    }

    #[test]
    fn python_repr_matches_python() {
        // Values and strings checked against CPython's repr().
        assert_eq!(
            python_float_repr(0.051546718925237656),
            "0.051546718925237656"
        );
        assert_eq!(python_float_repr(2.960503101348877), "2.960503101348877");
        assert_eq!(python_float_repr(2.0), "2.0");
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(
            python_float_repr(3.0000000095132306e-30),
            "3.0000000095132306e-30"
        );
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(123456.0), "123456.0");
        assert_eq!(python_float_repr(-0.5), "-0.5");
    }
}
